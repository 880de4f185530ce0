//! Session resume (README, "Resume"): no reply is lost to a dropped
//! connection.
//!
//! - [`replay`]: the frames a session sent, kept by `seq` until the client
//!   acknowledges them, replayed after a resume.
//! - [`lot`]: where dropped sessions wait for their client, with their
//!   tokens, TTLs and the process-wide byte budget.
//!
//! The session driver (`session::driver`) parks a session when its socket
//! drops and claims one when a new connection's first frame is `resume`.

pub mod lot;
pub mod replay;

pub use lot::{Claimed, LotStats, ParkingLot, Refusal, Ticket, Token};
pub use replay::{Gap, KeptBudget, ReplayBuffer};
