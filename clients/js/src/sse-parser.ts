/**
 * A streaming parser of `text/event-stream` (the HTTP fallback's downstream),
 * as the HTML standard's "event stream interpretation" describes it, without
 * I/O: feed it decoded text in chunks of any size, split anywhere.
 *
 * - Lines end with CRLF, LF or CR (a CRLF split across two chunks is one
 *   line end); a BOM at the very start is skipped.
 * - `data:` lines of one event are joined with `\n`; a blank line dispatches
 *   the event; an event without any `data:` line is not dispatched.
 * - `event:` names it (`message` by default); `id:` sets the last event id
 *   (ignored if it contains NUL) and persists across events; `retry:` (digits
 *   only) is kept in {@link SseParser.retry}; unknown fields are ignored.
 * - Lines starting with `:` are comments (keep-alives), reported to `onComment`.
 * - A last event without its blank line when the stream ends is discarded.
 */

export interface SseEvent {
  /** The `event:` field, `message` when absent. */
  event: string;
  /** The `data:` lines, joined with `\n`. */
  data: string;
  /** The `id:` field of this event, if it had one. */
  id: string | undefined;
  /** The last event id (this event's, or the last one before it that had one). */
  lastEventId: string;
}

export class SseParser {
  /** The last event id seen (the value to send as `Last-Event-ID`). */
  lastEventId = '';
  /** The last `retry:` value, in ms. */
  retry: number | undefined;
  /** Text after the last line end, in pieces (joined only when a line ends: no quadratic copying for long lines). */
  private partial: string[] = [];
  /** Characters in {@link partial}. */
  private partialLength = 0;
  /** The previous chunk ended with CR: a LF starting the next one belongs to it. */
  private skipLF = false;
  private started = false;
  private data: string[] = [];
  /** Characters in {@link data}. */
  private dataLength = 0;
  private event = '';
  private id: string | undefined;

  constructor(
    private readonly onEvent: (event: SseEvent) => void,
    private readonly onComment: (text: string) => void = () => {},
  ) {}

  /**
   * Characters held for the event being read: its `data:` lines and the
   * text waiting for a line end (a bound against a stream that never ends
   * a line, or an event).
   */
  get buffered(): number {
    return this.partialLength + this.dataLength;
  }

  /** Parses the next piece of the stream. */
  feed(chunk: string): void {
    if (!chunk) return;
    if (!this.started) {
      this.started = true;
      if (chunk.charCodeAt(0) === 0xfeff) chunk = chunk.slice(1);
    }
    if (this.skipLF) {
      this.skipLF = false;
      if (chunk.charCodeAt(0) === 10) chunk = chunk.slice(1);
    }
    let lf = chunk.indexOf('\n');
    let cr = chunk.indexOf('\r');
    if (lf < 0 && cr < 0) {
      if (chunk) {
        this.partial.push(chunk);
        this.partialLength += chunk.length;
      }
      return;
    }
    const text = this.partialLength ? this.partial.join('') + chunk : chunk;
    const offset = text.length - chunk.length;
    if (lf >= 0) lf += offset;
    if (cr >= 0) cr += offset;
    this.partial = [];
    this.partialLength = 0;
    let pos = 0;
    for (;;) {
      // Each index is searched again only once passed: linear in the chunk.
      if (lf >= 0 && lf < pos) lf = text.indexOf('\n', pos);
      if (cr >= 0 && cr < pos) cr = text.indexOf('\r', pos);
      const end = lf < 0 ? cr : cr < 0 ? lf : Math.min(lf, cr);
      if (end < 0) break;
      this.line(text.slice(pos, end));
      pos = end + 1;
      if (end === cr) {
        if (pos === text.length) this.skipLF = true;
        else if (text.charCodeAt(pos) === 10) pos++;
      }
    }
    const rest = text.slice(pos);
    if (rest) {
      this.partial.push(rest);
      this.partialLength = rest.length;
    }
  }

  private line(line: string): void {
    if (line === '') return this.dispatch();
    if (line.charCodeAt(0) === 58 /* : */) return this.onComment(line.slice(1));
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.charCodeAt(0) === 32) value = value.slice(1);
    switch (field) {
      case 'data':
        this.data.push(value);
        this.dataLength += value.length + 1;
        break;
      case 'event':
        this.event = value;
        break;
      case 'id':
        if (!value.includes('\0')) this.id = this.lastEventId = value;
        break;
      case 'retry':
        if (/^\d+$/.test(value)) this.retry = Number(value);
        break;
      default:
      // Unknown fields are ignored.
    }
  }

  private dispatch(): void {
    const { data, event, id } = this;
    this.data = [];
    this.dataLength = 0;
    this.event = '';
    this.id = undefined;
    if (data.length === 0) return;
    this.onEvent({ event: event || 'message', data: data.join('\n'), id, lastEventId: this.lastEventId });
  }
}
