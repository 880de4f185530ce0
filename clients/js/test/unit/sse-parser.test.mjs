// The text/event-stream parser (src/sse-parser.ts): fields, comments, line
// ends, and chunks split at every position.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SseParser } from '../../dist/sse-parser.js';

/** Parses `chunks` in order; returns the events and comments seen. */
function parse(chunks) {
  const events = [];
  const comments = [];
  const p = new SseParser((e) => events.push(e), (c) => comments.push(c));
  for (const c of chunks) p.feed(c);
  return { events, comments, parser: p };
}

const ROUTER_STREAM =
  'data: {"type":"welcome","data":{"session_id":"s"},"seq":0}\n\n' +
  ': keep-alive\n\n' +
  'id: 1\ndata: {"type":"echo","id":1,"data":"é ☃ 𝄞","done":true,"seq":1}\n\n' +
  'event: binary\ndata: AAH/\n\n' +
  'event: close\ndata: {"code":4001,"reason":"bye"}\n\n';

const EXPECTED = [
  { event: 'message', data: '{"type":"welcome","data":{"session_id":"s"},"seq":0}', id: undefined, lastEventId: '' },
  { event: 'message', data: '{"type":"echo","id":1,"data":"é ☃ 𝄞","done":true,"seq":1}', id: '1', lastEventId: '1' },
  { event: 'binary', data: 'AAH/', id: undefined, lastEventId: '1' },
  { event: 'close', data: '{"code":4001,"reason":"bye"}', id: undefined, lastEventId: '1' },
];

test("the router's events: frames, ids, a keep-alive comment, binary and close", () => {
  const { events, comments, parser } = parse([ROUTER_STREAM]);
  assert.deepEqual(events, EXPECTED);
  assert.deepEqual(comments, [' keep-alive']);
  assert.equal(parser.lastEventId, '1');
  assert.equal(parser.buffered, 0);
});

test('the same events whatever the chunking: split at every position, and one character at a time', () => {
  for (let i = 0; i <= ROUTER_STREAM.length; i++) {
    const { events, comments } = parse([ROUTER_STREAM.slice(0, i), ROUTER_STREAM.slice(i)]);
    assert.deepEqual(events, EXPECTED, `split at ${i}`);
    assert.deepEqual(comments, [' keep-alive'], `split at ${i}`);
  }
  const { events } = parse([...ROUTER_STREAM]);
  assert.deepEqual(events, EXPECTED);
});

test('CRLF, LF and CR line ends, a CRLF split across chunks counting once', () => {
  const crlf = ROUTER_STREAM.replaceAll('\n', '\r\n');
  const cr = ROUTER_STREAM.replaceAll('\n', '\r');
  for (const s of [crlf, cr]) {
    assert.deepEqual(parse([s]).events, EXPECTED);
    for (let i = 0; i <= s.length; i++) assert.deepEqual(parse([s.slice(0, i), s.slice(i)]).events, EXPECTED, `split at ${i}`);
  }
  // "\r" then "\n" in the next chunk is one line end, not a line end and a blank line (which would dispatch early).
  const { events } = parse(['data: a\r', '\ndata: b\r\n\r\n']);
  assert.deepEqual(events.map((e) => e.data), ['a\nb']);
});

test('data lines join with \\n; no space after the colon; a field without colon; unknown fields ignored', () => {
  const { events } = parse(['data:one\ndata\ndata:  two\nfoo: bar\nevent:x\n\n']);
  assert.deepEqual(events, [{ event: 'x', data: 'one\n\n two', id: undefined, lastEventId: '' }]);
});

test('an event without data is not dispatched; an empty data line is', () => {
  const { events } = parse(['event: nothing\nid: 7\n\n', 'data:\n\n']);
  assert.deepEqual(events, [{ event: 'message', data: '', id: undefined, lastEventId: '7' }]);
});

test('id persists across events, an id with NUL is ignored, retry keeps digits only', () => {
  const { events, parser } = parse(['id: 5\ndata: a\n\n', 'data: b\n\n', 'id: x\0y\ndata: c\n\nretry: 1500\n\nretry: 9s\n\n']);
  assert.deepEqual(events.map((e) => [e.data, e.id, e.lastEventId]), [
    ['a', '5', '5'],
    ['b', undefined, '5'],
    ['c', undefined, '5'],
  ]);
  assert.equal(parser.retry, 1500);
});

test('a BOM at the start is skipped (only there); an unterminated last event is not dispatched', () => {
  const { events, parser } = parse(['\uFEFFdata: a\n\n', '\uFEFFdata: b\n\n', 'data: never ended\n']);
  assert.deepEqual(events.map((e) => e.data), ['a']);
  const { events: second } = parse(['\uFEFFdata: a\n\ndata: \uFEFFb\n\n']);
  assert.deepEqual(second.map((e) => e.data), ['a', '\uFEFFb']);
  assert.equal(parser.buffered, 'never ended'.length + 1, 'the data of the event that has no blank line yet is counted');
});

test('a long line arriving in many chunks is buffered, counted, and parsed once complete', () => {
  const big = 'x'.repeat(100_000);
  const events = [];
  const p = new SseParser((e) => events.push(e));
  p.feed('data: ');
  for (let i = 0; i < big.length; i += 1000) p.feed(big.slice(i, i + 1000));
  assert.equal(p.buffered, 6 + big.length);
  assert.equal(events.length, 0);
  p.feed('\n\n');
  assert.equal(events[0].data, big);
  assert.equal(p.buffered, 0);
});

test('data lines of an event that never ends are counted, so the stream can be bounded; a dispatch frees them', () => {
  const p = new SseParser(() => {});
  for (let i = 0; i < 1000; i++) p.feed('data: xxxxxxxxxx\n');
  assert.equal(p.buffered, 1000 * 11);
  p.feed('\n');
  assert.equal(p.buffered, 0);
});
