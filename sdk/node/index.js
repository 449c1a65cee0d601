// procbroker: write services that run under procbroker, in Node.
export { Service, Context, EventContext, CallStream, DEFAULT_CALL_TIMEOUT_MS, STREAM_BUFFER } from './lib/service.js';
export { CallError, HANDLER } from './lib/errors.js';
export { Raw, encode, decode } from './lib/msgpack.js';
