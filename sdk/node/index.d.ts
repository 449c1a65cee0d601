// Type declarations of the procbroker package.

import type { Readable, Writable } from 'node:stream';

/** Any value MessagePack carries, as this package decodes and encodes it. */
export type Value =
  | null
  | undefined
  | boolean
  | number
  | bigint
  | string
  | Uint8Array
  | Date
  | Raw
  | Value[]
  | { [key: string]: Value };

/**
 * A failed call, or a handler's chosen failure. A handler that throws one
 * replies an `error` with its code and message; any other exception is
 * code `handler`.
 */
export declare class CallError extends Error {
  constructor(code: string, message: string, source?: string);
  /** Machine-readable: the broker's codes (`timeout`, `cancelled`, `busy`, …), `handler`, or a service's own. */
  readonly code: string;
  /** Who answered (`broker` for the broker's own errors), when known. */
  readonly source?: string;
}

/** The code of a handler's own errors unless it picks another. */
export declare const HANDLER: 'handler';

/**
 * Bytes that already are one encoded MessagePack value, sent as they are:
 * as a result, a partial reply, a call's or an event's payload, or nested
 * anywhere inside one. The constructor checks they hold exactly one value.
 */
export declare class Raw {
  constructor(bytes: Uint8Array);
  /** The encoded value (not copied: do not change it while it is being sent). */
  readonly bytes: Uint8Array;
  /** The value, decoded (integers beyond 2^53 as bigint). */
  decode(): any;
  /** The value under str key `key` of this map, undecoded (undefined when absent). */
  get(key: string): Raw | undefined;
}

/** Encodes a value (bigint as an integer, Raw verbatim). */
export declare function encode(value: Value): Uint8Array;
/** Decodes one value (integers beyond 2^53 as bigint, bin as Uint8Array). */
export declare function decode(bytes: Uint8Array): any;

/** Why the broker cancelled a request (or `shutting_down` at EOF); other strings may come. */
export type CancelReason = 'timeout' | 'cancelled' | 'caller_exited' | 'busy' | 'shutting_down' | (string & {});

/** A request as its handler sees it beyond the payload. */
export declare class Context {
  /** The requester's process id (`broker` for health checks). */
  readonly source: string;
  /** The request's correlation id (u64). */
  readonly correlationId: bigint;
  /** The method called. */
  readonly method: string;
  /** The payload's MessagePack bytes, undecoded (undefined when the request had none). */
  readonly rawPayload: Uint8Array | undefined;
  /** When the caller stops waiting, in epoch ms (undefined when the request carried no `timeout_ms`). */
  readonly deadline: number | undefined;
  /** The request's `timeout_ms` as delivered. */
  readonly timeoutMs: number | undefined;
  /** Whether the caller takes partial replies (`stream = true`). */
  readonly stream: boolean;
  /** The request's routing key, if it carried one. */
  readonly key: string | undefined;
  /**
   * Aborted when the broker cancels the request, or when stdin closes;
   * `signal.reason` is the reason (a CancelReason string).
   */
  readonly signal: AbortSignal;
  /** Whether the request was cancelled. */
  readonly cancelled: boolean;
  /** Why it was cancelled, if it was. */
  readonly cancelReason: CancelReason | undefined;
  /** Whole milliseconds left before the deadline, rounded down (0 once past; undefined without one). */
  remainingMs(): number | undefined;
}

/** What an event handler knows of its event besides the payload. */
export declare class EventContext {
  /** The sender's process id. */
  readonly source: string;
  /** The event's name. */
  readonly method: string;
  /** The payload's MessagePack bytes (undefined when the event had none). */
  readonly rawPayload: Uint8Array | undefined;
}

/**
 * What a handler returns: the reply's payload (`undefined`: none), a
 * promise of it, or a generator / async generator whose yields are partial
 * replies and whose return value is the final reply's payload.
 */
export type HandlerResult =
  | Value
  | Promise<Value>
  | Generator<Value, Value, undefined>
  | AsyncGenerator<Value, Value, undefined>;

export type Handler<P = any> = (payload: P, ctx: Context) => HandlerResult;
export type EventHandler<P = any> = (payload: P, ctx: EventContext) => void | Promise<void>;

export interface MethodOptions {
  /** `false`: the handler gets the payload as a Raw (or undefined), undecoded. Default true. */
  decode?: boolean;
}

export interface CallOptions {
  /** The call's deadline in ms (sent as `timeout_ms`; default 30 000). */
  timeoutMs?: number;
  /** Routing key: calls to a service with the same key reach the same worker (at most 256 bytes). */
  key?: string;
  /** Aborting it cancels the call at the broker; the call rejects with code `cancelled`. */
  signal?: AbortSignal;
  /** `true`: resolve with the reply's payload as a Raw, undecoded. */
  raw?: boolean;
}

/**
 * The replies of a streaming call: the partial replies' payloads, then the
 * end; the final reply's payload is the iterator's return value and
 * `result`. An error reply throws from the iteration. Leaving the loop
 * early cancels the call. A reader 1000 partial replies behind cuts it
 * (`busy`).
 */
export declare class CallStream<T = any, R = any> implements AsyncIterableIterator<T> {
  /** The final reply's payload; rejects with the call's CallError. */
  readonly result: Promise<R>;
  /** The call's correlation id (undefined if it was never sent). */
  readonly correlationId: bigint | undefined;
  next(): Promise<IteratorResult<T, R>>;
  return(value?: any): Promise<IteratorResult<T, any>>;
  [Symbol.asyncIterator](): this;
}

export interface ServiceOptions {
  /** This process's id (default: `PROCBROKER_PROCESS_ID`, else `standalone`). */
  processId?: string;
  /** Largest frame read or written (default 16 MiB, the broker's default). */
  maxFrameBytes?: number;
  /** Frames in (default: stdin). */
  input?: Readable;
  /** Frames out (default: stdout; then anything else written to stdout goes to stderr). */
  output?: Writable;
  /** End the process when serving ends (default: true when serving on stdin/stdout). */
  exit?: boolean;
  /** Where log lines go (default: stderr). */
  log?: (line: string) => void;
}

/** A service under procbroker. */
export declare class Service {
  constructor(options?: ServiceOptions);
  /** This process's id. */
  readonly processId: string;
  /** This process's service name (`PROCBROKER_SERVICE`). */
  readonly serviceName: string | undefined;
  /** Aborted when serving ends: `shutdown` from the broker, or EOF. */
  readonly signal: AbortSignal;
  /** Calls in flight. */
  readonly pendingCalls: number;

  /** Serves method `name`. */
  method<P = any>(name: string, handler: Handler<P>, options?: MethodOptions): this;
  /** Handles the event `name`. */
  on<P = any>(name: string, handler: EventHandler<P>, options?: MethodOptions): this;
  /**
   * Announces `ready` and serves until EOF (or, after `shutdown` from the
   * broker, until the requests in flight are answered); `main` runs once
   * ready. Resolves with the exit status (then, on stdin/stdout, the
   * process exits).
   */
  run(main?: (svc: this) => unknown): Promise<number>;
  /** Calls `method` of `target`; rejects with a CallError. */
  call<R = any>(target: string, method: string, payload?: Value, options?: CallOptions): Promise<R>;
  /** Calls `method` of `target` asking for partial replies. */
  stream<T = any, R = any>(target: string, method: string, payload?: Value, options?: CallOptions): CallStream<T, R>;
  /** Sends event `name` to `target` (queued; returns nothing). */
  emit(target: string, name: string, payload?: Value): void;
}

/** A call's deadline when the caller sets none, in ms. */
export declare const DEFAULT_CALL_TIMEOUT_MS: number;
/** Partial replies a stream holds unread before it is cut. */
export declare const STREAM_BUFFER: number;
