//! The end-to-end harness: a real `redis-server` on a free loopback port and the real
//! `cache-money-server` binary, each started, probed until ready, and stopped by its own PID.
#![allow(dead_code)] // Each test binary uses its own part of the harness.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use cache_money::pb::{self, cache_money_client::CacheMoneyClient};
use tonic::transport::Channel;

/// A `SCAN MATCH` pattern of the servers' invalidation streams (`{prefix}#invalidations`),
/// which tests that count a store's keys leave out.
pub const INVALIDATION_STREAMS: &str = "*#invalidations";

/// Whether `key` is a server's invalidation stream (`{prefix}#invalidations`), not an entry
/// or an index.
pub fn is_invalidation_stream(key: &[u8]) -> bool {
    key.ends_with(b"#invalidations")
}

/// How long any process gets to become ready before the test fails.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Polls `check` every few milliseconds until it holds or `within` passes; returns whether it
/// held. A readiness probe, never a fixed sleep.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Python of the test virtualenv (`.venv`, which `scripts/test` creates with
/// `examples/python/requirements.txt`), or `CACHE_MONEY_PYTHON`; fails clearly when missing.
pub fn venv_python() -> PathBuf {
    let python = std::env::var_os("CACHE_MONEY_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    assert!(
        python.exists(),
        "no Python with grpcio and prometheus_client at {}: run scripts/test, which creates .venv",
        python.display()
    );
    python
}

/// One HTTP/1.1 answer, as [`http_get`] read it.
#[derive(Debug)]
pub struct HttpReply {
    /// The status code.
    pub status: u16,
    /// Header lines, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body, as text.
    pub body: String,
}

impl HttpReply {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Sends `METHOD path` with `headers` over a new connection to `addr` and reads the answer
/// until the server closes the connection.
pub fn http_request(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> HttpReply {
    let mut stream = TcpStream::connect(addr).expect("connect to the HTTP listener");
    stream
        .set_read_timeout(Some(READY_TIMEOUT))
        .expect("set a read timeout");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .expect("send the request");
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .expect("read the answer to the end");
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {answer:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_lowercase(), value.trim().to_owned()))
        .collect();
    HttpReply {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// `GET path` from `addr`.
pub fn http_get(addr: SocketAddr, path: &str, headers: &[&str]) -> HttpReply {
    http_request(addr, "GET", path, headers)
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// A `redis-server` child process on 127.0.0.1.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts Redis on a free port with persistence off.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts Redis with extra `--option value` arguments (e.g. `--maxmemory 1mb`).
    pub fn start_with(extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|arg| arg.to_string()).collect();
        // Another process may take the port between our probe and Redis's bind; then Redis
        // exits and we try another.
        for _ in 0..10 {
            let port = free_port();
            if let Some(child) = Self::spawn(port, &extra) {
                return RedisServer {
                    child: Some(child),
                    port,
                    extra,
                };
            }
        }
        panic!("redis-server did not bind any of 10 free ports");
    }

    fn spawn(port: u16, extra: &[String]) -> Option<Child> {
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--loglevel", "warning"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (the README test command installs it)");
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if child.try_wait().expect("poll redis-server").is_some() {
                return None;
            }
            if Self::answers_ping(port) {
                return Some(child);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// True when something on the port speaks Redis: PONG, or NOAUTH from one that wants a
    /// password.
    fn answers_ping(port: u16) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && (&reply == b"+PONG\r\n" || reply.starts_with(b"-NOAUTH"))
    }

    /// The port Redis listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for the server's `--redis-url`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A direct connection, to check what the server really wrote (and for the test's own
    /// commands). Its replies may take as long as a loaded
    /// machine needs (a pipelined fill of 10,000 entries took over redis-rs's default 500 ms
    /// once): a test bounds its own waits.
    pub async fn connect(&self) -> redis::aio::MultiplexedConnection {
        let config =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .expect("connect to test redis")
    }

    /// Number of keys in the database, invalidation streams not counted (every write and
    /// bust appends to its prefix's `…#invalidations`; see [`is_invalidation_stream`]).
    pub async fn dbsize(&self) -> u64 {
        let size: u64 = redis::cmd("DBSIZE")
            .query_async(&mut self.connect().await)
            .await
            .expect("DBSIZE");
        size - self.scan_match(INVALIDATION_STREAMS).await.len() as u64
    }

    /// The keys Redis's own `SCAN MATCH pattern` finds, walking the whole keyspace.
    pub async fn scan_match(&self, pattern: &str) -> BTreeSet<String> {
        scan_all(&mut self.connect().await, pattern).await
    }

    /// Holds back every write for up to `ms` milliseconds (`CLIENT PAUSE ms WRITE`), sent on
    /// `admin` (reads, PING included, still pass).
    pub async fn pause_writes(admin: &mut redis::aio::MultiplexedConnection, ms: u64) {
        redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(ms)
            .arg("WRITE")
            .query_async::<()>(admin)
            .await
            .expect("CLIENT PAUSE");
    }

    /// Lets writes through again (`CLIENT UNPAUSE`), sent on `admin`.
    pub async fn unpause(admin: &mut redis::aio::MultiplexedConnection) {
        redis::cmd("CLIENT")
            .arg("UNPAUSE")
            .query_async::<()>(admin)
            .await
            .expect("CLIENT UNPAUSE");
    }

    /// The redis-server process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis is running").id()
    }

    /// Kills Redis (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts Redis again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(Self::spawn(self.port, &self.extra).expect("redis restarts on its port"));
    }

    /// Freezes Redis (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        send_signal(self.pid(), "STOP");
    }

    /// Thaws Redis (SIGCONT).
    pub fn resume(&self) {
        send_signal(self.pid(), "CONT");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A frozen process ignores SIGKILL until it is continued on some kernels' views.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}

/// Everything the server wrote to standard error, and a way to wait for a line.
#[derive(Debug, Default)]
struct LogBook {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

/// The real `cache-money-server` binary, listening on a free port.
#[derive(Debug)]
pub struct CacheServer {
    child: Child,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    logs: Arc<LogBook>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl CacheServer {
    /// Starts the server in memory.
    pub fn memory(extra: &[&str]) -> Self {
        Self::start(extra)
    }

    /// Starts the server in front of `redis`.
    pub fn redis(redis: &RedisServer, extra: &[&str]) -> Self {
        let url = redis.url();
        let mut args = vec!["--redis-url", url.as_str()];
        args.extend_from_slice(extra);
        Self::start(&args)
    }

    /// Starts the binary with `args`, on port 0, and waits for its start-up line.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// As [`CacheServer::start`], with extra environment variables (they override
    /// `RUST_LOG=info`).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let args = args.iter().map(|arg| arg.to_string()).collect();
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::start_on("127.0.0.1:0", args, env)
    }

    /// Kills the server and starts it again with the same arguments on the same address.
    pub fn restart(&mut self) {
        self.kill();
        let replacement =
            Self::start_on(&self.addr.to_string(), self.args.clone(), self.env.clone());
        *self = replacement;
    }

    /// Kills the server (SIGKILL) and waits until it is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the binary on `listen`, unless `args` or `env` choose the address themselves.
    fn start_on(listen: &str, args: Vec<String>, env: Vec<(String, String)>) -> Self {
        let chosen = args.iter().any(|arg| arg == "--listen")
            || env.iter().any(|(name, _)| name == "CACHE_MONEY_LISTEN");
        let listen: &[&str] = if chosen { &[] } else { &["--listen", listen] };
        let mut child = Command::new(env!("CARGO_BIN_EXE_cache-money-server"))
            .args(listen)
            .args(&args)
            .env("RUST_LOG", "info")
            .env_remove("CACHE_MONEY_REDIS_URL")
            .env_remove("CACHE_MONEY_REDIS_CLUSTER")
            .env_remove("CACHE_MONEY_AUTH_TOKENS")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cache-money-server");
        let logs = Arc::new(LogBook::default());
        let stderr = child.stderr.take().expect("piped stderr");
        let book = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                book.lines.lock().unwrap().push(line);
                book.grew.notify_all();
            }
        });
        let mut server = CacheServer {
            child,
            addr: "127.0.0.1:0".parse().unwrap(),
            metrics_addr: None,
            logs,
            args,
            env,
        };
        let started = server
            .wait_for_log("cache-money serving", READY_TIMEOUT)
            .unwrap_or_else(|| panic!("server did not start; its log:\n{}", server.log_text()));
        // `listen=ADDR` in text logs, `"listen":"ADDR"` in JSON ones; strings are quoted.
        let field = |name: &str| {
            started.split([' ', ',']).find_map(|field| {
                let value = field
                    .strip_prefix(&format!("{name}="))
                    .or_else(|| field.strip_prefix(&format!("\"{name}\":")))?;
                Some(value.trim_matches('"').to_owned())
            })
        };
        let listen = field("listen").expect("start-up line names the address");
        server.addr = listen.parse().expect("listen address parses");
        server.metrics_addr = field("metrics_listen").and_then(|addr| addr.parse().ok());
        server
    }

    /// Where the server serves `/metrics` (it was started with `--metrics-listen`).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
            .expect("the server was started with --metrics-listen")
    }

    /// Waits until a log line contains `needle`; returns it.
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        let mut lines = self.logs.lines.lock().unwrap();
        loop {
            if let Some(line) = lines.iter().find(|line| line.contains(needle)) {
                return Some(line.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            lines = self.logs.grew.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// All log lines so far.
    pub fn log_text(&self) -> String {
        self.logs.lines.lock().unwrap().join("\n")
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The gRPC endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A new channel (its own HTTP/2 connection) to the server.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("url")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to cache-money-server")
    }

    /// A raw cache client.
    pub async fn client(&self) -> CacheMoneyClient<Channel> {
        CacheMoneyClient::new(self.channel().await)
    }

    /// Freezes the server (SIGSTOP): its connections stay open, nothing answers.
    pub fn freeze(&self) {
        send_signal(self.child.id(), "STOP");
    }

    /// Thaws a frozen server (SIGCONT).
    pub fn thaw(&self) {
        send_signal(self.child.id(), "CONT");
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        send_signal(self.child.id(), "TERM");
    }

    /// Waits up to `within` for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll server") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for CacheServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `grpc.health.v1.Health/Check` says of the cache service, on a new connection.
pub async fn health(server: &CacheServer) -> i32 {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut health = HealthClient::new(server.channel().await);
    health
        .check(HealthCheckRequest {
            service: "cache_money.v1.CacheMoney".into(),
        })
        .await
        .expect("health answers even when the store is down")
        .into_inner()
        .status
}

/// Whether health reports `status` within `within` (probed, not slept).
pub async fn health_becomes(
    server: &CacheServer,
    status: tonic_health::pb::health_check_response::ServingStatus,
    within: Duration,
) -> bool {
    eventually(within, || async { health(server).await == status as i32 }).await
}

/// Every key `SCAN MATCH pattern` finds on the Redis behind `conn`, cursor to cursor.
async fn scan_all<K: redis::FromRedisValue + Ord>(
    conn: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> BTreeSet<K> {
    let (mut cursor, mut found) = (0u64, BTreeSet::new());
    loop {
        let (next, keys): (u64, Vec<K>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("SCAN");
        found.extend(keys);
        cursor = next;
        if cursor == 0 {
            return found;
        }
    }
}

/// A digest made from a number, so tests can name many distinct entries.
pub fn digest(n: u64) -> String {
    format!("{n:032x}")
}

/// A key message.
pub fn key(namespace: &str, function: &str, n: u64) -> pb::Key {
    pb::Key {
        namespace: namespace.into(),
        function: function.into(),
        digest: digest(n),
    }
}

/// `message` in a gRPC frame: flag 0, its length, its bytes.
pub fn framed(message: &[u8]) -> bytes::Bytes {
    framed_with(0, message.len() as u32, message)
}

/// A gRPC frame with any flag and any announced length, for what a peer might send.
pub fn framed_with(flag: u8, len: u32, payload: &[u8]) -> bytes::Bytes {
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(flag);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    frame.into()
}

/// A Put request.
pub fn put(key: pb::Key, value: &[u8], ttl_seconds: u32) -> pb::PutRequest {
    pb::PutRequest {
        key: Some(key),
        value: value.to_vec().into(),
        ttl_seconds,
        ..Default::default()
    }
}

/// A plain Get request: no lease, no tags, no stale window.
pub fn get_request(key: pb::Key) -> pb::GetRequest {
    pb::GetRequest {
        key: Some(key),
        ..Default::default()
    }
}

/// Reads one entry: `Some(value)` on a hit.
pub async fn get(client: &mut CacheMoneyClient<Channel>, key: pb::Key) -> Option<Vec<u8>> {
    let reply = client
        .get(get_request(key))
        .await
        .expect("Get succeeds")
        .into_inner();
    reply.hit.then(|| reply.value.to_vec())
}

/// Busts every entry of one function; returns how many were removed.
pub async fn bust_function(
    client: &mut CacheMoneyClient<Channel>,
    namespace: &str,
    function: &str,
) -> u64 {
    let request = pb::BustFunctionRequest {
        namespace: namespace.into(),
        function: function.into(),
    };
    client
        .bust_function(request)
        .await
        .expect("BustFunction succeeds")
        .into_inner()
        .removed
}

/// Busts every entry of `namespace` written with `tag`; returns how many were removed.
pub async fn bust_tag(client: &mut CacheMoneyClient<Channel>, namespace: &str, tag: &str) -> u64 {
    let request = pb::BustTagRequest {
        namespace: namespace.into(),
        tag: tag.into(),
    };
    client
        .bust_tag(request)
        .await
        .expect("BustTag succeeds")
        .into_inner()
        .removed
}

/// Busts everything the server stored; returns how many entries were removed.
pub async fn bust_all(client: &mut CacheMoneyClient<Channel>) -> u64 {
    let reply = client.bust_all(pb::BustAllRequest {}).await;
    reply.expect("BustAll succeeds").into_inner().removed
}

/// Writes `count` entries of function `ns.{function}` straight into Redis under `prefix`, as
/// the server would.
pub async fn fill(redis: &RedisServer, prefix: &str, function: &str, count: u64) {
    let mut conn = redis.connect().await;
    for chunk in (0..count).collect::<Vec<_>>().chunks(10_000) {
        let mut pipe = redis::pipe();
        for n in chunk {
            pipe.cmd("SET")
                .arg(format!("{prefix}ns:{function}:{}", digest(*n)))
                .arg("v")
                .arg("EX")
                .arg(600)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.expect("fill redis");
    }
}

/// A TCP forwarder on a free loopback port, standing in for a load balancer or a DNS name in
/// front of the server: it can be pointed at another server (new connections go there, open
/// ones stay where they are), it counts the connections it accepted, and it can hold back the
/// server's bytes on each new connection for a while (a slow link).
#[derive(Debug)]
pub struct Forwarder {
    addr: SocketAddr,
    state: Arc<Mutex<ForwardTo>>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    closed_by_client: Arc<std::sync::atomic::AtomicUsize>,
    closed_by_server: Arc<std::sync::atomic::AtomicUsize>,
    /// While set, bytes are read and dropped both ways: a flow a firewall dropped.
    blackhole: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// Copies `from` to `to` until `from` ends, dropping the bytes while `blackhole` is set.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blackhole: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0; 64 * 1024];
    while let Ok(read @ 1..) = from.read(&mut buffer).await {
        if !blackhole.load(std::sync::atomic::Ordering::Relaxed)
            && to.write_all(&buffer[..read]).await.is_err()
        {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[derive(Debug)]
struct ForwardTo {
    target: SocketAddr,
    delay: Duration,
}

impl Forwarder {
    /// Forwards to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        Self::start_with_delay(target, Duration::ZERO).await
    }

    /// Forwards to `target`, holding back what the server says on each new connection for
    /// `delay`.
    pub async fn start_with_delay(target: SocketAddr, delay: Duration) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the forwarder");
        let addr = listener.local_addr().expect("forwarder address");
        let state = Arc::new(Mutex::new(ForwardTo { target, delay }));
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let closed_by_client = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let closed_by_server = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let blackhole = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (shared, count, closed) = (state.clone(), accepted.clone(), closed_by_client.clone());
        let (server_closed, holes) = (closed_by_server.clone(), blackhole.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                count.fetch_add(1, Relaxed);
                let (target, delay) = {
                    let to = shared.lock().unwrap();
                    (to.target, to.delay)
                };
                let (closed, server_closed) = (closed.clone(), server_closed.clone());
                let (up, down) = (holes.clone(), holes.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (client_read, client_write) = inbound.into_split();
                    let (server_read, server_write) = outbound.into_split();
                    tokio::spawn(async move {
                        pump(client_read, server_write, up).await;
                        closed.fetch_add(1, Relaxed);
                    });
                    tokio::time::sleep(delay).await;
                    pump(server_read, client_write, down).await;
                    server_closed.fetch_add(1, Relaxed);
                });
            }
        });
        Forwarder {
            addr,
            state,
            accepted,
            closed_by_client,
            closed_by_server,
            blackhole,
            task,
        }
    }

    /// Sends new connections to `target` from now on.
    pub fn point_at(&self, target: SocketAddr) {
        self.state.lock().unwrap().target = target;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Drops every byte both ways from now on, keeping the connections open: what a client
    /// or server sees when a firewall silently drops the flow.
    pub fn blackhole(&self) {
        self.blackhole
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Connections the server side has closed so far.
    pub fn closed_by_server(&self) -> usize {
        self.closed_by_server
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connections the client side has closed so far.
    pub fn closed_by_client(&self) -> usize {
        self.closed_by_client
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The URL clients use to reach the server through the forwarder.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Log lines written while a test runs, for checking what a user would read.
#[derive(Clone, Default)]
pub struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Captures this thread's `tracing` output at `warn` and above until the guard drops.
    pub fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    /// The `WARN` lines captured so far.
    pub fn warnings(&self) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|line| line.contains("WARN"))
            .collect()
    }

    /// Every line captured so far.
    pub fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// The hash slot of a Redis key (CRC16/XMODEM of the key, or of its `{hash tag}`, mod 16384),
/// computed here so tests can group keys by node without asking the server.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let close = key[open + 1..].iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &key[open + 1..open + 1 + close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &byte in tagged {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

/// One node of a [`RedisCluster`].
#[derive(Debug)]
struct ClusterNode {
    child: Option<Child>,
    port: u16,
}

/// A Redis Cluster of three primaries and one replica each: six `redis-server` processes on
/// free loopback ports, joined by `redis-cli --cluster create`, ready when every node reports
/// `cluster_state:ok`, agrees on the slot map and every replica is in sync; stopped by PID on
/// drop.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
    dir: PathBuf,
}

/// The shared cluster of one test binary, while any test holds it.
static SHARED_CLUSTER: Mutex<std::sync::Weak<RedisCluster>> = Mutex::new(std::sync::Weak::new());

impl RedisCluster {
    /// The cluster shared by the tests of this binary that run at the same time: started on
    /// first use, stopped when the last holder drops it. Tests sharing it isolate themselves
    /// with their own `--key-prefix` (see [`unique_prefix`]).
    pub fn shared() -> Arc<RedisCluster> {
        let mut shared = SHARED_CLUSTER.lock().unwrap();
        if let Some(cluster) = shared.upgrade() {
            return cluster;
        }
        let cluster = Arc::new(RedisCluster::start(5_000));
        *shared = Arc::downgrade(&cluster);
        cluster
    }

    /// Starts a cluster of its own whose nodes declare a silent peer failed after
    /// `node_timeout_ms` (`cluster-node-timeout`), which bounds how soon a replica takes over.
    pub fn start(node_timeout_ms: u64) -> Self {
        static CLUSTERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("cache-money-cluster-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the cluster's directory");
        let nodes = (0..6)
            .map(|_| Self::spawn_node(&dir, node_timeout_ms))
            .collect();
        let cluster = RedisCluster { nodes, dir };
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for port in cluster.ports() {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let output = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli is installed (it comes with redis-server)");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        cluster.wait_until_settled();
        cluster
    }

    fn spawn_node(dir: &std::path::Path, node_timeout_ms: u64) -> ClusterNode {
        for _ in 0..10 {
            let (port, bus) = (free_port(), free_port());
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus.to_string(),
                ])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .args(["--cluster-node-timeout", &node_timeout_ms.to_string()])
                .arg("--dir")
                .arg(dir)
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .args(["--loglevel", "warning"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed");
            let deadline = Instant::now() + READY_TIMEOUT;
            while Instant::now() < deadline {
                if child.try_wait().expect("poll redis-server").is_some() {
                    break;
                }
                if RedisServer::answers_ping(port) {
                    return ClusterNode {
                        child: Some(child),
                        port,
                    };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("a cluster node did not bind any of 10 free port pairs");
    }

    /// Waits until every live node reports `cluster_state:ok`, all agree on which primary
    /// serves which slots, and every replica is in sync with its primary.
    pub fn wait_until_settled(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.settled() {
                Ok(()) => return,
                Err(why) => last = why,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the cluster did not settle within 60 s: {last}");
    }

    fn settled(&self) -> Result<(), String> {
        let mut maps = BTreeSet::new();
        for port in self.live_ports() {
            let mut conn = Self::sync_connection(port)?;
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut conn)
                .map_err(|err| format!("{port}: {err}"))?;
            if !info.contains("cluster_state:ok") {
                return Err(format!("{port}: not cluster_state:ok"));
            }
            maps.insert(Self::slot_map(&mut conn)?);
            let replication: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut conn)
                .map_err(|err| format!("{port}: {err}"))?;
            if replication.contains("role:slave") && !replication.contains("master_link_status:up")
            {
                return Err(format!("{port}: replica not in sync"));
            }
        }
        if maps.len() != 1 {
            return Err(format!("nodes disagree on the slot map: {maps:?}"));
        }
        Ok(())
    }

    fn sync_connection(port: u16) -> Result<redis::Connection, String> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .map_err(|err| err.to_string())?;
        let conn = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .map_err(|err| format!("{port}: {err}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|err| err.to_string())?;
        Ok(conn)
    }

    /// `(first slot, last slot, primary port)` of every range, in order.
    fn slot_map(conn: &mut redis::Connection) -> Result<Vec<(u16, u16, u16)>, String> {
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(conn)
            .map_err(|err| err.to_string())?;
        let mut map = Vec::new();
        for range in ranges {
            let redis::Value::Array(fields) = range else {
                return Err("odd CLUSTER SLOTS".into());
            };
            let (start, end): (u16, u16) = (
                redis::from_redis_value_ref(&fields[0]).map_err(|err| err.to_string())?,
                redis::from_redis_value_ref(&fields[1]).map_err(|err| err.to_string())?,
            );
            let redis::Value::Array(primary) = &fields[2] else {
                return Err("odd CLUSTER SLOTS".into());
            };
            let port: u16 =
                redis::from_redis_value_ref(&primary[1]).map_err(|err| err.to_string())?;
            map.push((start, end, port));
        }
        map.sort_unstable();
        Ok(map)
    }

    /// Every node's port, dead ones included.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|node| node.port).collect()
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|node| node.child.is_some())
            .map(|node| node.port)
            .collect()
    }

    /// The value for `--redis-cluster`: every node as a seed.
    pub fn seeds(&self) -> String {
        self.ports()
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The slot map as a live node sees it: `(first slot, last slot, primary port)`.
    pub fn slot_ranges(&self) -> Vec<(u16, u16, u16)> {
        let port = self.live_ports()[0];
        let mut conn = Self::sync_connection(port).expect("connect to a live node");
        Self::slot_map(&mut conn).expect("CLUSTER SLOTS")
    }

    /// The ports of the primaries serving slots now.
    pub fn primaries(&self) -> Vec<u16> {
        let ports: BTreeSet<u16> = self.slot_ranges().iter().map(|range| range.2).collect();
        ports.into_iter().collect()
    }

    /// The port of the primary serving `key`.
    pub fn primary_of(&self, key: &[u8]) -> u16 {
        Self::serving(&self.slot_ranges(), key)
    }

    /// The ports of the primaries serving `keys`.
    pub fn primaries_of<K: AsRef<[u8]>>(&self, keys: &[K]) -> BTreeSet<u16> {
        let ranges = self.slot_ranges();
        keys.iter()
            .map(|key| Self::serving(&ranges, key.as_ref()))
            .collect()
    }

    fn serving(ranges: &[(u16, u16, u16)], key: &[u8]) -> u16 {
        let slot = key_slot(key);
        ranges
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .expect("every slot is served")
            .2
    }

    /// A direct connection to one node.
    pub async fn node(&self, port: u16) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .expect("node url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to a cluster node")
    }

    /// Writes `keys` (with `value`, expiring in ten minutes) straight into their primaries,
    /// one pipeline per primary.
    pub async fn set_keys(&self, keys: &[Vec<u8>], value: &[u8]) {
        let ranges = self.slot_ranges();
        let mut by_node: std::collections::BTreeMap<u16, Vec<&Vec<u8>>> = Default::default();
        for key in keys {
            by_node
                .entry(Self::serving(&ranges, key))
                .or_default()
                .push(key);
        }
        for (port, keys) in by_node {
            let mut conn = self.node(port).await;
            for chunk in keys.chunks(10_000) {
                let mut pipe = redis::pipe();
                for key in chunk {
                    pipe.cmd("SET")
                        .arg(key)
                        .arg(value)
                        .arg("EX")
                        .arg(600)
                        .ignore();
                }
                pipe.query_async::<()>(&mut conn)
                    .await
                    .expect("fill a node");
            }
        }
    }

    /// The keys each primary's own `SCAN MATCH pattern` finds, over the whole cluster.
    pub async fn scan_match(&self, pattern: &str) -> BTreeSet<Vec<u8>> {
        let mut found = BTreeSet::new();
        for port in self.primaries() {
            found.extend(scan_all::<Vec<u8>>(&mut self.node(port).await, pattern).await);
        }
        found
    }

    /// Freezes one node (SIGSTOP): its connections stay open, it answers nothing.
    pub fn freeze(&self, port: u16) {
        send_signal(self.pid(port), "STOP");
    }

    /// Thaws a frozen node (SIGCONT).
    pub fn thaw(&self, port: u16) {
        send_signal(self.pid(port), "CONT");
    }

    fn pid(&self, port: u16) -> u32 {
        let node = self.nodes.iter().find(|node| node.port == port);
        let child = node.and_then(|node| node.child.as_ref());
        child.expect("a live node of this cluster").id()
    }

    /// Kills one node (SIGKILL) by its PID and waits until it is gone.
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|node| node.port == port)
            .expect("a node of this cluster");
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = Command::new("kill")
                    .args(["-CONT", &child.id().to_string()])
                    .status();
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A key prefix no other test in this process uses, so tests sharing a store stay apart.
pub fn unique_prefix(name: &str) -> String {
    static PREFIXES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = PREFIXES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{name}{n}:")
}

impl CacheServer {
    /// Starts the server in front of `cluster`.
    pub fn cluster(cluster: &RedisCluster, extra: &[&str]) -> Self {
        let seeds = cluster.seeds();
        let mut args = vec!["--redis-cluster", seeds.as_str()];
        args.extend_from_slice(extra);
        Self::start(&args)
    }
}
