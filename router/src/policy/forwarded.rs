//! Who the client is behind a proxy (README, "Behind a proxy").
//!
//! `X-Forwarded-For` and `Forwarded` are plain request headers: anyone can
//! send them. They are read only when the TCP peer is one of
//! `TRUSTED_PROXIES`, and then from the right (the hop nearest to the
//! router) leftwards: each address that is itself a trusted proxy is
//! skipped, and the first one that is not is the client. A hop that is not
//! an address (`unknown`, an obfuscated name, garbage) ends the walk: what
//! lies to its left was written by nobody the router trusts, so the last
//! trusted hop is taken as the client.
//!
//! Only one header is read, the one the proxies write
//! (`TRUSTED_PROXY_HEADER`: `X-Forwarded-For` by default, or `Forwarded`,
//! RFC 7239): a proxy passes the other one through from the client
//! untouched, so reading both would let a client write its own address.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The client as the router sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr {
    /// The client's address: the TCP peer's, or the one a trusted proxy
    /// reported.
    pub ip: IpAddr,
    /// The TCP peer.
    pub peer: SocketAddr,
}

impl ClientAddr {
    /// Whether the address came from a trusted proxy's header.
    pub fn forwarded(&self) -> bool {
        self.ip != self.peer.ip()
    }
}

impl std::fmt::Display for ClientAddr {
    /// `ip:port` of a direct client; the bare address of a forwarded one
    /// (the proxy's port says nothing about the client).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.forwarded() {
            write!(f, "{}", self.ip)
        } else {
            write!(f, "{}", self.peer)
        }
    }
}

/// Which header trusted proxies write (`TRUSTED_PROXY_HEADER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ProxyHeader {
    /// `X-Forwarded-For` (haproxy `option forwardfor`, nginx
    /// `$proxy_add_x_forwarded_for`).
    #[default]
    #[value(name = "x-forwarded-for")]
    XForwardedFor,
    /// `Forwarded`, RFC 7239.
    #[value(name = "forwarded")]
    Forwarded,
}

/// The client of a request from `peer` with `headers`.
pub fn client_addr(
    peer: SocketAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    header: ProxyHeader,
) -> ClientAddr {
    // A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let direct = ClientAddr {
        ip: peer.ip(),
        peer,
    };
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if trusted.is_empty() || !is_trusted(&peer.ip()) {
        return direct;
    }
    let hops = match header {
        ProxyHeader::XForwardedFor => x_forwarded_for(headers),
        ProxyHeader::Forwarded => forwarded_for(headers),
    };
    let Some(hops) = hops else { return direct };
    let mut client = peer.ip();
    for hop in hops.iter().rev() {
        match hop {
            Some(ip) => {
                client = *ip;
                if !is_trusted(ip) {
                    break;
                }
            }
            None => break,
        }
    }
    ClientAddr { ip: client, peer }
}

/// The hops of every `X-Forwarded-For` line, in order; `None` for a hop
/// that is not an address.
fn x_forwarded_for(headers: &HeaderMap) -> Option<Vec<Option<IpAddr>>> {
    let mut hops = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(text) = value.to_str() else {
            hops.push(None);
            continue;
        };
        hops.extend(text.split(',').map(|h| parse_hop(h.trim())));
    }
    (!hops.is_empty()).then_some(hops)
}

/// The `for=` hops of every `Forwarded` line, in order.
fn forwarded_for(headers: &HeaderMap) -> Option<Vec<Option<IpAddr>>> {
    let mut hops = Vec::new();
    for value in headers.get_all("forwarded") {
        let Ok(text) = value.to_str() else {
            hops.push(None);
            continue;
        };
        for element in text.split(',') {
            let node = element.split(';').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                k.trim().eq_ignore_ascii_case("for").then(|| v.trim())
            });
            // An element without `for=` says nothing about this hop's
            // client: it cannot be trusted past.
            hops.push(node.and_then(|v| parse_hop(v.trim_matches('"'))));
        }
    }
    (!hops.is_empty()).then_some(hops)
}

/// An address, possibly with a port (`192.0.2.1:80`, `[2001:db8::1]:80`).
fn parse_hop(s: &str) -> Option<IpAddr> {
    let ip = if let Ok(ip) = s.parse::<IpAddr>() {
        Some(ip)
    } else if let Ok(addr) = s.parse::<SocketAddr>() {
        Some(addr.ip())
    } else {
        s.strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|r| r.parse::<IpAddr>().ok())
    };
    ip.map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn client(peer: &str, h: &[(&'static str, &'static str)], trusted: &[&str]) -> String {
        client_addr(
            peer.parse().unwrap(),
            &headers(h),
            &nets(trusted),
            ProxyHeader::XForwardedFor,
        )
        .to_string()
    }

    fn client_fwd(peer: &str, h: &[(&'static str, &'static str)], trusted: &[&str]) -> String {
        client_addr(
            peer.parse().unwrap(),
            &headers(h),
            &nets(trusted),
            ProxyHeader::Forwarded,
        )
        .to_string()
    }

    #[test]
    fn headers_from_untrusted_peers_are_ignored() {
        let xff = [("x-forwarded-for", "203.0.113.9")];
        assert_eq!(client("198.51.100.7:5000", &xff, &[]), "198.51.100.7:5000");
        assert_eq!(
            client("198.51.100.7:5000", &xff, &["10.0.0.0/8"]),
            "198.51.100.7:5000",
            "a forged header from a client is not believed"
        );
    }

    #[test]
    fn the_first_untrusted_hop_from_the_right_is_the_client() {
        let trusted = ["10.0.0.0/8"];
        // The client forged the leftmost entry; the proxies appended the rest.
        let h = [("x-forwarded-for", "1.2.3.4, 203.0.113.9, 10.0.0.2")];
        assert_eq!(client("10.0.0.1:443", &h, &trusted), "203.0.113.9");
        // Several header lines are one list, in order.
        let h = [
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "203.0.113.9"),
        ];
        assert_eq!(client("10.0.0.1:443", &h, &trusted), "203.0.113.9");
        // All hops trusted: the leftmost.
        let h = [("x-forwarded-for", "10.1.1.1, 10.0.0.2")];
        assert_eq!(client("10.0.0.1:443", &h, &trusted), "10.1.1.1");
        // No header from a trusted proxy: the proxy is the client.
        assert_eq!(client("10.0.0.1:443", &[], &trusted), "10.0.0.1:443");
    }

    #[test]
    fn garbage_ends_the_walk_at_the_last_trusted_hop() {
        let trusted = ["10.0.0.0/8"];
        let h = [("x-forwarded-for", "203.0.113.9, unknown, 10.0.0.2")];
        assert_eq!(client("10.0.0.1:443", &h, &trusted), "10.0.0.2");
        let h = [("x-forwarded-for", "not an address")];
        assert_eq!(client("10.0.0.1:443", &h, &trusted), "10.0.0.1:443");
    }

    #[test]
    fn only_the_configured_header_is_read() {
        let trusted = ["10.0.0.0/8"];
        // The proxy writes X-Forwarded-For and passes the client's forged
        // Forwarded through: it must not count.
        let h = [
            ("forwarded", "for=6.6.6.6"),
            ("x-forwarded-for", "203.0.113.9"),
        ];
        assert_eq!(client("10.0.0.1:443", &h, &trusted), "203.0.113.9");
        let h = [("forwarded", "for=6.6.6.6")];
        assert_eq!(client("10.0.0.1:443", &h, &trusted), "10.0.0.1:443");
        // And the other way round.
        let h = [
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=203.0.113.9"),
        ];
        assert_eq!(client_fwd("10.0.0.1:443", &h, &trusted), "203.0.113.9");
    }

    #[test]
    fn ipv4_mapped_peers_and_hops_match_ipv4_blocks() {
        let trusted = ["127.0.0.0/8"];
        let h = [("x-forwarded-for", "::ffff:203.0.113.9")];
        assert_eq!(
            client("[::ffff:127.0.0.1]:443", &h, &trusted),
            "203.0.113.9"
        );
    }

    #[test]
    fn forwarded_is_parsed_with_ports_and_brackets() {
        let trusted = ["10.0.0.0/8", "::1/128"];
        let h = [(
            "forwarded",
            "for=192.0.2.60;proto=https;by=10.0.0.1, For=\"[2001:db8:cafe::17]:4711\"",
        )];
        assert_eq!(
            client_fwd("10.0.0.1:443", &h, &trusted),
            "2001:db8:cafe::17"
        );
        let h = [("forwarded", "for=192.0.2.60:8080")];
        assert_eq!(client_fwd("[::1]:443", &h, &trusted), "192.0.2.60");
        let h = [("forwarded", "for=_hidden, for=10.0.0.5")];
        assert_eq!(client_fwd("10.0.0.1:443", &h, &trusted), "10.0.0.5");
        let h = [("forwarded", "proto=https")];
        assert_eq!(client_fwd("10.0.0.1:443", &h, &trusted), "10.0.0.1:443");
    }
}
