//! Limits the client and the server share, so neither sends what the other refuses to read.

/// The largest gRPC message either side reads by default: 8 MiB. The server decodes requests
/// up to it (`--max-message-bytes`) and answers a `GetMany` only while the response stays
/// under it (`--max-response-bytes`); the client's receive limit defaults to it.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;
