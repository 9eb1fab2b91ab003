//! A real `redis-server` (Debian's package) on a free loopback port, no persistence, killed by
//! its PID. Tests that need one call `Redis::start()`: on a dev machine without the binary it
//! returns `None` after saying why (the test then skips); where `LLMPROXY_REQUIRE_REDIS` is set
//! (`.ci/run` sets it) a missing binary fails the test instead.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    /// `Some` for a TLS-only server: the directory with `ca.pem`, `srv.pem`, `srv.key`.
    tls: Option<PathBuf>,
}

fn binary() -> Option<&'static str> {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    found.then_some("redis-server")
}

impl Redis {
    pub fn start() -> Option<Redis> {
        if binary().is_none() {
            if std::env::var_os("LLMPROXY_REQUIRE_REDIS").is_some() {
                panic!("redis-server not found and LLMPROXY_REQUIRE_REDIS is set");
            }
            eprintln!(
                "SKIPPED: redis-server is not installed (apt-get install redis-server); \
                 the shared rate-limit tests need a real one"
            );
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut r = Redis {
            child: None,
            port,
            tls: None,
        };
        r.restart();
        Some(r)
    }

    /// A TLS-only server whose certificate is signed by a CA made now in `dir` (`ca.pem`, for the
    /// client's trust store). `None` (after saying why) without `openssl` or `redis-server`.
    pub fn start_tls(dir: &Path) -> Option<Redis> {
        let made = make_certs(dir);
        if !made {
            if std::env::var_os("LLMPROXY_REQUIRE_REDIS").is_some() {
                panic!("could not make test certificates with openssl");
            }
            eprintln!("SKIPPED: openssl could not make test certificates");
            return None;
        }
        let mut r = Redis::start()?;
        r.kill();
        r.tls = Some(dir.to_path_buf());
        r.restart();
        Some(r)
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Starts (again, empty) on the same port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => cmd.args(["--port", &self.port.to_string()]),
            Some(dir) => cmd
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(dir.join("srv.pem"))
                .arg("--tls-key-file")
                .arg(dir.join("srv.key"))
                .args(["--tls-auth-clients", "no"]),
        };
        let child = cmd
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            let up = match self.tls {
                None => self.command("PING").starts_with("+PONG"),
                Some(_) => TcpStream::connect(self.addr()).is_ok(),
            };
            if up {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer PING", self.port);
    }

    /// Kills it (SIGKILL, by PID): gone at once, like a crashed pod.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) it: a store that accepts nothing and answers nothing.
    pub fn freeze(&self, frozen: bool) {
        let pid = self.child.as_ref().expect("redis-server running").id() as i32;
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // The libc crate exposes kill as unsafe; our own child's PID.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig})");
    }

    /// One inline command; the raw reply (empty when unreachable).
    pub fn command(&self, cmd: &str) -> String {
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr(), Duration::from_millis(500)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(format!("{cmd}\r\n").as_bytes()).is_err() {
            return String::new();
        }
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A frozen process still dies of SIGKILL; thawing first is only for tidiness.
            self.freeze(false);
        }
        self.kill();
    }
}

/// A CA and a server certificate for 127.0.0.1 signed by it (a self-signed leaf is refused by
/// rustls as a CA used as an end entity).
fn make_certs(dir: &Path) -> bool {
    let openssl = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .is_ok()
        && openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=llmproxy-test-ca",
        ])
        && openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=127.0.0.1",
        ])
        && openssl(&[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ])
}
