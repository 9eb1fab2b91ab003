//! The mock's listener and the state of its one runtime: binding, accepting (through std, for
//! SO_LINGER), the switches `/mock/control` flips and the counters `/mock/stats` reads.
//!
//! Everything here lives on the mock's single thread (`Rc`/`Cell`); only `MockStats` is shared
//! with the caller, as atomics. It never blocks the runtime: a failing `accept` backs off on a
//! timer.

use std::{
    cell::Cell,
    io,
    net::SocketAddr,
    rc::Rc,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use monoio::net::{TcpListener, TcpStream};

use super::{
    conn::serve_connection,
    state::{Batch, Server},
    MockOptions, MockStats,
};

/// Build the runtime, bind, report the address, accept forever.
pub(super) fn serve(
    opts: MockOptions,
    stats: Arc<MockStats>,
    on_bound: impl FnOnce(SocketAddr),
) -> io::Result<()> {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()?;
    rt.block_on(async move {
        let listener = Listener::bind(SocketAddr::new(opts.host, opts.port))?;
        let addr = listener.local_addr()?;
        on_bound(addr);
        let server = Rc::new(Server {
            engine: Cell::new(opts.engine),
            context_limit: Cell::new(None),
            opts,
            stats,
            port: addr.port(),
            health_status: Cell::new(None),
            fail_status: Cell::new(None),
            reset_every: Cell::new(0),
            inference_seen: Cell::new(0),
            next_id: Cell::new(0),
            batch: Batch::default(),
        });
        loop {
            match listener.accept().await.and_then(adopt) {
                Ok((stream, handle)) => {
                    server.stats.connections.fetch_add(1, Ordering::Relaxed);
                    monoio::spawn(serve_connection(stream, handle, server.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    log::warn!("mock backend: accept failed: {e}");
                    monoio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    })
}

/// The listening socket, accepted from through std rather than `monoio::net::TcpListener::accept`.
///
/// Why: `x-mock-reset-after` needs SO_LINGER on the connection, and a monoio `TcpStream` exposes
/// no handle to set it without `unsafe` (which the crate forbids). Accepting with std yields a
/// `std::net::TcpStream` whose duplicate we keep for that; monoio only reports readiness, on a
/// duplicate of the listening socket.
struct Listener {
    /// Non-blocking; `accept` loops on it until `WouldBlock`.
    socket: std::net::TcpListener,
    /// The same socket registered with the runtime, used only for `readable`.
    ready: TcpListener,
}

impl Listener {
    fn bind(addr: SocketAddr) -> io::Result<Self> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        // No SO_REUSEPORT: a second mock on the same port must fail, not share the traffic.
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        socket.set_nonblocking(true)?;
        let socket = std::net::TcpListener::from(socket);
        let ready = TcpListener::from_std(socket.try_clone()?)?;
        Ok(Self { socket, ready })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    async fn accept(&self) -> io::Result<std::net::TcpStream> {
        loop {
            match self.socket.accept() {
                Ok((stream, _)) => return Ok(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.ready.readable(false).await?
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Hand an accepted socket to monoio, keeping a duplicate handle for SO_LINGER.
fn adopt(stream: std::net::TcpStream) -> io::Result<(TcpStream, socket2::Socket)> {
    stream.set_nodelay(true)?;
    // As monoio's own accept does: blocking fds for io_uring, non-blocking for epoll.
    stream.set_nonblocking(monoio::utils::is_legacy())?;
    let handle = socket2::Socket::from(stream.try_clone()?);
    Ok((TcpStream::from_std(stream)?, handle))
}
