//! The client side of one connection, as every step of a request sees it: the socket halves, the
//! bytes read ahead (the next pipelined request), the timer its reads and writes run under, who
//! the peer is, and the key id cache.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use crate::alarm::Alarm;
use crate::auth::KeyIdCache;
use crate::tls::io::{ClientReader, ClientWriter};
use bytes::BytesMut;

pub(crate) struct Downstream {
    pub(crate) rd: ClientReader,
    pub(crate) wr: ClientWriter,
    /// Bytes read from the client and not yet consumed (start of the next request).
    pub(crate) buf: BytesMut,
    pub(crate) peer: SocketAddr,
    /// The client's IP as text, formatted once per connection (for X-Forwarded-For).
    pub(crate) peer_ip: Rc<str>,
    /// Accepted on the admin listener.
    pub(crate) admin: bool,
    /// The one timer every read and write of this connection (and of its requests' upstream
    /// exchanges) runs under, one after the other (`alarm`).
    pub(crate) alarm: Alarm,
    /// `timeouts.write`: how long one write to this client may stall before it is dropped.
    pub(crate) write_timeout: Duration,
    /// The `key_id` of the last client key seen on this connection.
    pub(crate) key_ids: KeyIdCache,
}
