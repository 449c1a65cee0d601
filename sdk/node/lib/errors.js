/**
 * A failed call, or a handler's chosen failure: `code` is machine-readable
 * (the broker's codes, `handler` for a handler's own errors, or any code a
 * service picks), `message` human-readable. A handler that throws one
 * replies an `error` with that code and message.
 */
export class CallError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {string} [source] who answered (`broker` for the broker's own errors)
   */
  constructor(code, message, source) {
    super(message);
    this.name = 'CallError';
    this.code = String(code);
    if (source !== undefined) this.source = source;
  }
}

/** The code of a handler's own errors unless it picks another. */
export const HANDLER = 'handler';
