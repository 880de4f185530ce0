// Resume bookkeeping: seq de-duplication, the resume frame, acks.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Session } from '../../dist/session.js';

const welcome = (extra = {}) => ({
  session_id: 's1',
  route: '/r',
  path: '/r',
  heartbeat_ms: 1,
  limits: { max_message_bytes: 1, max_in_flight: 1 },
  resume_token: 'tok1',
  resume_ttl_ms: 30_000,
  ...extra,
});

test('each seq is processed at most once, and never one at or below the highest', () => {
  const s = new Session(64);
  s.fresh(welcome());
  const fed = [1, 2, 2, 3, 1, 5, 4, 5, 6];
  const taken = fed.filter((seq) => s.accept(seq));
  assert.deepEqual(taken, [1, 2, 3, 5, 6]);
  assert.equal(s.lastSeq, 6);
  assert.equal(s.accept(0), false, 'the welcome seq is never taken as a session frame');
});

test('the resume frame carries the session, its token and the last processed seq, exactly', () => {
  const s = new Session(64);
  s.fresh(welcome());
  for (const seq of [1, 2, 3]) s.accept(seq);
  assert.deepEqual(JSON.parse(s.resumeFrame(17)), {
    type: 'resume',
    id: 17,
    data: { session_id: 's1', resume_token: 'tok1', last_seq: 3 },
  });
  assert.equal(s.resumable, true);
  // A successful resume swaps the token; the session id stays the old one.
  s.resumed({ session_id: 's1', resume_token: 'tok2', replayed: 0, in_flight: [] }, welcome({ session_id: 's9', resume_token: 'x' }));
  assert.equal(JSON.parse(s.resumeFrame(18)).data.resume_token, 'tok2');
  assert.equal(s.id, 's1');
  s.forget();
  assert.equal(s.resumable, false);
});

test('resume is off when the welcome has no token or a TTL of 0', () => {
  const s = new Session(64);
  s.fresh(welcome({ resume_ttl_ms: 0 }));
  assert.equal(s.resumable, false);
  s.fresh(welcome({ resume_token: undefined, resume_ttl_ms: undefined }));
  assert.equal(s.resumable, false);
  s.accept(1);
  assert.equal(s.ackDue(true), undefined, 'no acks when resume is off');
});

test('acks every ackEvery frames, or what is owed when forced, never twice for the same seq', () => {
  const s = new Session(4);
  s.fresh(welcome());
  for (const seq of [1, 2, 3]) s.accept(seq);
  assert.equal(s.ackDue(false), undefined, '3 < 4 frames');
  s.accept(4);
  assert.equal(s.ackDue(false), 4);
  assert.equal(s.ackDue(true), undefined, 'nothing new since');
  s.accept(5);
  assert.equal(s.owesAck, true);
  assert.equal(s.ackDue(true), 5, 'the timer forces the rest');
  assert.equal(s.owesAck, false);
});
