//! The Docker files, checked without a Docker engine: `docker-compose.yml` wires Redis and the
//! server the way the README says, its health check runs a command the image really has (run
//! here against the real binary), and the Dockerfile builds from a context `.dockerignore`
//! keeps small, with dependencies cached in their own layer and CA certificates at run time.

mod common;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::CacheServer;
use globset::{GlobBuilder, GlobMatcher};
use yaml_rust2::{Yaml, YamlLoader};

/// The compose service that runs cache-money-server.
const SERVER_SERVICE: &str = "cache-money";
/// The compose service that runs Redis.
const REDIS_SERVICE: &str = "redis";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(name: &str) -> String {
    std::fs::read_to_string(root().join(name)).unwrap_or_else(|err| panic!("read {name}: {err}"))
}

fn compose() -> Yaml {
    let mut documents = YamlLoader::load_from_str(&read("docker-compose.yml"))
        .expect("docker-compose.yml is valid YAML");
    assert_eq!(documents.len(), 1, "docker-compose.yml has one document");
    documents.remove(0)
}

fn service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    let service = &compose["services"][name];
    assert!(
        !service.is_badvalue(),
        "docker-compose.yml has no service {name:?}"
    );
    service
}

/// A service's `environment`, in either of compose's forms (a map, or `KEY=VALUE` lines).
fn environment(service: &Yaml) -> Vec<(String, String)> {
    match &service["environment"] {
        Yaml::Hash(map) => map
            .iter()
            .map(|(key, value)| {
                let value = match value {
                    Yaml::String(text) | Yaml::Real(text) => text.clone(),
                    Yaml::Integer(n) => n.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => panic!("environment value {other:?} is not a scalar"),
                };
                (key.as_str().expect("string key").to_owned(), value)
            })
            .collect(),
        Yaml::Array(lines) => lines
            .iter()
            .map(|line| {
                let line = line.as_str().expect("environment lines are strings");
                let (key, value) = line.split_once('=').expect("KEY=VALUE");
                (key.to_owned(), value.to_owned())
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn strings(list: &Yaml) -> Vec<String> {
    list.as_vec()
        .map(|items| {
            items
                .iter()
                .map(|item| item.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// One Dockerfile instruction: the keyword (upper case) and the rest of its line(s).
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
}

/// The Dockerfile's stages, each the instructions from one `FROM` to the next.
fn stages() -> Vec<Vec<Instruction>> {
    let mut stages: Vec<Vec<Instruction>> = Vec::new();
    let mut logical = String::new();
    for line in read("Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(continued) => {
                logical.push_str(continued);
                logical.push(' ');
                continue;
            }
            None => logical.push_str(trimmed),
        }
        let (keyword, args) = logical.split_once(' ').unwrap_or((&logical, ""));
        let instruction = Instruction {
            keyword: keyword.to_uppercase(),
            args: args.trim().to_owned(),
        };
        if instruction.keyword == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("the Dockerfile starts with FROM")
            .push(instruction);
        logical.clear();
    }
    stages
}

/// A `COPY`'s `--from` stage (if any), its sources and its destination.
fn copy_parts(args: &str) -> (Option<String>, Vec<String>, String) {
    assert!(!args.contains('['), "COPY {args}: use the plain form here");
    let mut from = None;
    let mut words: Vec<String> = Vec::new();
    for word in args.split_whitespace() {
        match word.strip_prefix("--") {
            Some(flag) => {
                if let Some(stage) = flag.strip_prefix("from=") {
                    from = Some(stage.to_owned());
                }
            }
            None => words.push(word.to_owned()),
        }
    }
    let destination = words.pop().expect("COPY has a destination");
    (from, words, destination)
}

/// `.dockerignore` as Docker reads it: patterns in order, the last one matching a path (or
/// one of its parent folders) decides, `!` re-includes.
struct DockerIgnore {
    patterns: Vec<(bool, GlobMatcher)>,
}

impl DockerIgnore {
    fn load() -> Self {
        let patterns = read(".dockerignore")
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| {
                let (include, pattern) = match line.strip_prefix('!') {
                    Some(pattern) => (true, pattern),
                    None => (false, line),
                };
                let pattern = pattern.trim_start_matches('/').trim_end_matches('/');
                // Docker's `*` and `?` stop at `/`; only `**` crosses folders.
                let glob = GlobBuilder::new(pattern)
                    .literal_separator(true)
                    .build()
                    .unwrap_or_else(|err| panic!(".dockerignore {line:?}: {err}"));
                (!include, glob.compile_matcher())
            })
            .collect();
        DockerIgnore { patterns }
    }

    /// Whether `path` (relative to the context, `/`-separated) is left out of the context.
    fn excludes(&self, path: &str) -> bool {
        let path = path.trim_start_matches("./").trim_end_matches('/');
        // A pattern matching a parent folder covers everything inside it.
        let mut candidates: Vec<&str> = path.match_indices('/').map(|(i, _)| &path[..i]).collect();
        candidates.push(path);
        self.patterns
            .iter()
            .rev()
            .find(|(_, matcher)| candidates.iter().any(|path| matcher.is_match(path)))
            .is_some_and(|(excludes, _)| *excludes)
    }
}

/// The server and Redis run as two services, the server pointed at the Redis service.
#[test]
fn compose_points_the_server_at_the_redis_service() {
    let compose = compose();
    service(&compose, REDIS_SERVICE);
    let server = service(&compose, SERVER_SERVICE);
    let env = environment(server);
    let url = env
        .iter()
        .find(|(key, _)| key == "CACHE_MONEY_REDIS_URL")
        .map(|(_, url)| url.as_str())
        .expect("the server is given CACHE_MONEY_REDIS_URL");
    let authority = url
        .split_once("://")
        .map(|(_, rest)| rest.split('/').next().unwrap_or_default())
        .expect("CACHE_MONEY_REDIS_URL is a URL");
    let host = authority.rsplit('@').next().unwrap_or_default();
    let host = host.split(':').next().unwrap_or_default();
    assert_eq!(host, REDIS_SERVICE, "CACHE_MONEY_REDIS_URL {url}");
    let depends_on = &server["depends_on"];
    assert!(
        !depends_on[REDIS_SERVICE].is_badvalue() || strings(depends_on).contains(&"redis".into()),
        "the server does not depend on {REDIS_SERVICE}"
    );
}

/// Only the server's gRPC port is published, on the host's loopback, at the port the image
/// listens on; Redis is not published at all.
#[test]
fn compose_publishes_only_the_server_on_loopback() {
    let compose = compose();
    let redis = service(&compose, REDIS_SERVICE);
    assert!(
        redis["ports"].is_badvalue(),
        "Redis must not be published: {:?}",
        redis["ports"]
    );
    let ports = strings(&service(&compose, SERVER_SERVICE)["ports"]);
    assert!(!ports.is_empty(), "the server publishes its gRPC port");
    let listen = image_listen();
    for port in ports {
        let Some(mapping) = port.strip_prefix("127.0.0.1:") else {
            panic!("port {port:?} is published beyond the host's loopback (127.0.0.1:…)");
        };
        let container_port = mapping.rsplit(':').next().unwrap_or_default();
        assert_eq!(
            container_port,
            listen.port().to_string(),
            "port {port:?} does not reach the image's CACHE_MONEY_LISTEN {listen}"
        );
    }
}

/// Grafana's admin password has no default: compose passes GRAFANA_ADMIN_PASSWORD through
/// (empty when unset, never `admin`), and the service's entrypoint, run here with `sh` as the
/// container would, refuses to start Grafana without one and goes on to `/run.sh` with one.
#[test]
fn compose_grafana_requires_an_admin_password() {
    let compose = compose();
    let grafana = service(&compose, "grafana");
    let password = environment(grafana)
        .into_iter()
        .find(|(key, _)| key == "GF_SECURITY_ADMIN_PASSWORD")
        .map(|(_, value)| value)
        .expect("grafana sets GF_SECURITY_ADMIN_PASSWORD");
    assert_eq!(
        password, "${GRAFANA_ADMIN_PASSWORD:-}",
        "no default password"
    );
    let entrypoint = strings(&grafana["entrypoint"]);
    let [shell, flag, script] = entrypoint.as_slice() else {
        panic!("grafana's entrypoint is not [shell, -c, script]: {entrypoint:?}");
    };
    assert_eq!((shell.as_str(), flag.as_str()), ("/bin/sh", "-c"));
    // Compose turns `$$` into `$` before the container sees it.
    let script = script.replace("$$", "$");
    let run = |password: Option<&str>| {
        let mut command = Command::new("sh");
        command
            .args(["-c", &script])
            .env_remove("GF_SECURITY_ADMIN_PASSWORD");
        if let Some(password) = password {
            command.env("GF_SECURITY_ADMIN_PASSWORD", password);
        }
        command.output().expect("run sh")
    };
    for missing in [None, Some("")] {
        let refused = run(missing);
        assert_eq!(refused.status.code(), Some(64), "{missing:?}: {refused:?}");
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("set GRAFANA_ADMIN_PASSWORD"),
            "{refused:?}"
        );
    }
    // With a password it execs Grafana's own entrypoint, which this machine does not have.
    let started = run(Some("s3cret-for-test"));
    assert_ne!(started.status.code(), Some(64), "{started:?}");
    assert!(
        String::from_utf8_lossy(&started.stderr).contains("/run.sh"),
        "{started:?}"
    );
}

/// The runtime stage's `ENV` lines.
fn image_env() -> Vec<(String, String)> {
    let stages = stages();
    let runtime = stages.last().expect("a stage");
    runtime
        .iter()
        .filter(|instruction| instruction.keyword == "ENV")
        .map(|instruction| {
            let (key, value) = instruction.args.split_once('=').expect("ENV KEY=VALUE");
            (key.to_owned(), value.to_owned())
        })
        .collect()
}

fn image_listen() -> SocketAddr {
    image_env()
        .iter()
        .find(|(key, _)| key == "CACHE_MONEY_LISTEN")
        .map(|(_, listen)| listen.parse().expect("CACHE_MONEY_LISTEN is an address"))
        .expect("the image sets CACHE_MONEY_LISTEN (the server's default is loopback only)")
}

/// Runs the compose health check as the container would: the image's environment and the
/// service's, on the real binary, with the image's listen port moved to `port`.
fn run_compose_health_check(port: u16) -> Output {
    let compose = compose();
    let server = service(&compose, SERVER_SERVICE);
    let test = strings(&server["healthcheck"]["test"]);
    let [form, binary, args @ ..] = test.as_slice() else {
        panic!("the server's healthcheck.test is [\"CMD\", binary, args…], got {test:?}");
    };
    assert_eq!(
        form, "CMD",
        "exec form: the runtime image needs no shell for it"
    );

    // The binary must be one the runtime stage installs on the PATH.
    let stages = stages();
    let installed: Vec<String> = stages
        .last()
        .expect("a stage")
        .iter()
        .filter(|instruction| instruction.keyword == "COPY")
        .map(|instruction| copy_parts(&instruction.args).2)
        .collect();
    let on_path = format!("/usr/local/bin/{binary}");
    assert!(
        installed.contains(&on_path) || installed.contains(binary),
        "the runtime stage installs {installed:?}, not the healthcheck's {binary:?}"
    );
    assert_eq!(
        binary, "cache-money",
        "the healthcheck runs the image's CLI"
    );

    // The probe's address is the container's loopback at the port the image listens on;
    // here the port is the test server's.
    let image_port = image_listen().port();
    let args: Vec<String> = args
        .iter()
        .map(|arg| arg.replace(&format!(":{image_port}"), &format!(":{port}")))
        .collect();
    assert!(
        args.iter()
            .any(|arg| arg.ends_with(&format!("127.0.0.1:{port}"))),
        "the healthcheck probes the image's port {image_port} on loopback: {args:?}"
    );
    Command::new(env!("CARGO_BIN_EXE_cache-money"))
        .args(&args)
        .env_clear()
        .envs(image_env())
        .envs(environment(server))
        .output()
        .expect("run the healthcheck command")
}

/// The server's compose health check is a command the image has, and it passes against a
/// serving server and fails once the server is gone.
#[test]
fn compose_health_check_probes_the_server() {
    let mut server = CacheServer::memory(&[]);
    let port = server.addr().port();
    let output = run_compose_health_check(port);
    assert!(
        output.status.success(),
        "healthcheck failed against a serving server: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    server.kill();
    let output = run_compose_health_check(port);
    assert!(
        !output.status.success(),
        "healthcheck passed with no server"
    );
}

/// Every `COPY` source of the build exists and is in the context `.dockerignore` leaves, and
/// what they copy is a package cargo can load.
#[test]
fn dockerfile_copies_only_what_the_context_has() {
    let ignore = DockerIgnore::load();
    let context = std::env::temp_dir().join(format!("cache-money-context-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context).unwrap();
    for stage in stages() {
        let mut workdir = PathBuf::from("/");
        for instruction in stage {
            match instruction.keyword.as_str() {
                "WORKDIR" => workdir = workdir.join(&instruction.args),
                "COPY" => {
                    let (from, sources, destination) = copy_parts(&instruction.args);
                    if from.is_some() {
                        continue;
                    }
                    for source in sources {
                        assert!(
                            root().join(&source).exists(),
                            "COPY {source}: not in the repository"
                        );
                        assert!(
                            !ignore.excludes(&source),
                            "COPY {source}: excluded by .dockerignore"
                        );
                        let target = workdir.join(&destination);
                        let target = context.join(target.strip_prefix("/").unwrap());
                        let into_folder = destination.ends_with('/');
                        copy_into(&ignore, Path::new(&source), &target, into_folder);
                    }
                }
                _ => {}
            }
        }
    }
    // Cargo refuses a manifest whose declared targets (the binary, benches) have no file;
    // `cargo metadata` instead leaves them out, so compare with the repository's.
    let needed = targets(&root().join("Cargo.toml"));
    let copied = targets(&context.join("src/Cargo.toml"));
    let _ = std::fs::remove_dir_all(&context);
    let missing: Vec<_> = needed.difference(&copied).collect();
    assert!(
        missing.is_empty(),
        "targets missing from the build context: {missing:?}"
    );
}

/// The library, binary, build script and bench targets of the package at `manifest`, as
/// `(kind, name)`: the targets cargo needs the files of to load the manifest.
fn targets(manifest: &Path) -> BTreeSet<(String, String)> {
    let output = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .arg("--manifest-path")
        .arg(manifest)
        .output()
        .expect("run cargo metadata");
    assert!(
        output.status.success(),
        "cargo metadata {}: {}",
        manifest.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
    let targets = metadata["packages"][0]["targets"]
        .as_array()
        .expect("the package has targets");
    targets
        .iter()
        .flat_map(|target| {
            let name = target["name"].as_str().expect("a target name").to_owned();
            let kinds = target["kind"].as_array().expect("target kinds").clone();
            kinds
                .into_iter()
                .map(move |kind| (kind.as_str().expect("a kind").to_owned(), name.clone()))
        })
        .filter(|(kind, _)| matches!(kind.as_str(), "lib" | "bin" | "bench" | "custom-build"))
        .collect()
}

/// Copies the context path `source` to `target` (into it, when `into_folder`) as `COPY` does:
/// a folder's contents, less what `.dockerignore` leaves out of the context.
fn copy_into(ignore: &DockerIgnore, source: &Path, target: &Path, into_folder: bool) {
    let from = root().join(source);
    let target = if into_folder && from.is_file() {
        target.join(from.file_name().expect("a file name"))
    } else {
        target.to_owned()
    };
    if from.is_file() {
        std::fs::create_dir_all(target.parent().expect("a parent")).unwrap();
        std::fs::copy(&from, &target).unwrap();
        return;
    }
    for entry in std::fs::read_dir(&from).unwrap() {
        let name = entry.unwrap().file_name();
        let path = source.join(&name);
        if !ignore.excludes(path.to_str().expect("UTF-8 paths")) {
            copy_into(ignore, &path, &target.join(&name), false);
        }
    }
}

/// Local state (build output, git, the Python virtualenv, generated stubs, Redis dumps,
/// secrets beside the checkout) is never sent to the Docker engine.
#[test]
fn dockerignore_keeps_local_state_out_of_the_context() {
    let ignore = DockerIgnore::load();
    for path in [
        "target",
        ".git",
        ".venv",
        "gen",
        "examples/python/__pycache__",
        "dump.rdb",
        "tokens.json",
        "server.key",
    ] {
        assert!(ignore.excludes(path), "{path} is sent as build context");
    }
}

/// Dependencies are built in a layer of their own, before the crate's sources are copied, so
/// a source edit does not rebuild them.
#[test]
fn dockerfile_builds_dependencies_before_copying_sources() {
    let stages = stages();
    let build = &stages[0];
    let copies = |path: &str| {
        build.iter().position(|instruction| {
            instruction.keyword == "COPY"
                && copy_parts(&instruction.args)
                    .1
                    .iter()
                    .any(|source| source == path)
        })
    };
    let first_build = build
        .iter()
        .position(|instruction| {
            instruction.keyword == "RUN" && instruction.args.contains("cargo build")
        })
        .expect("the build stage runs cargo build");
    let lock = copies("Cargo.lock").expect("Cargo.lock is copied");
    assert!(
        lock < first_build,
        "Cargo.lock is copied after the first build"
    );
    for sources in ["client", "server"] {
        let copied = copies(sources).unwrap_or_else(|| panic!("{sources}/ is copied"));
        assert!(
            first_build < copied,
            "{sources}/ is copied before the dependencies are built"
        );
    }
}

/// The runtime image has CA certificates, so `rediss://` verifies against the system trust
/// store in a container as it does on a host.
#[test]
fn runtime_image_has_ca_certificates() {
    let stages = stages();
    let runtime = stages.last().expect("a stage");
    assert!(
        runtime
            .iter()
            .any(|instruction| instruction.keyword == "RUN"
                && instruction.args.contains("apt-get install")
                && instruction.args.contains("ca-certificates")),
        "the runtime stage does not install ca-certificates"
    );
}

/// The compose profile of the Redis Cluster deployment.
const CLUSTER_PROFILE: &str = "cluster";
/// The cluster's nodes, as the init service and the servers name them.
const CLUSTER_NODES: [&str; 6] = [
    "redis-node-1",
    "redis-node-2",
    "redis-node-3",
    "redis-node-4",
    "redis-node-5",
    "redis-node-6",
];
/// The one-shot service that forms the cluster.
const CLUSTER_INIT: &str = "redis-cluster-init";
/// The server replicas over the cluster.
const CLUSTER_SERVERS: [&str; 2] = ["cache-money-1", "cache-money-2"];

/// A service with its YAML merge keys (`<<: *anchor`) applied, as compose applies them: the
/// anchored mapping's keys, overridden by the service's own.
fn merged_service(compose: &Yaml, name: &str) -> Yaml {
    let Yaml::Hash(own) = service(compose, name) else {
        panic!("service {name:?} is not a mapping");
    };
    let merge_key = Yaml::String("<<".into());
    let mut merged = match own.get(&merge_key) {
        Some(Yaml::Hash(base)) => base.clone(),
        Some(other) => panic!("service {name:?}: `<<` is not a mapping: {other:?}"),
        None => yaml_rust2::yaml::Hash::new(),
    };
    for (key, value) in own {
        if *key != merge_key {
            merged.insert(key.clone(), value.clone());
        }
    }
    Yaml::Hash(merged)
}

/// The names of the services in `profile`, or of those in no profile for `None`.
fn services_in(compose: &Yaml, profile: Option<&str>) -> BTreeSet<String> {
    let services = compose["services"]
        .as_hash()
        .expect("services is a mapping");
    services
        .keys()
        .map(|name| name.as_str().expect("service names are strings").to_owned())
        .filter(|name| {
            let profiles = strings(&merged_service(compose, name)["profiles"]);
            match profile {
                None => profiles.is_empty(),
                Some(profile) => profiles.iter().any(|p| p == profile),
            }
        })
        .collect()
}

/// The value of `flag` in a command line given as a list.
fn flag_value<'a>(command: &'a [String], flag: &str) -> Option<&'a str> {
    let at = command.iter().position(|arg| arg == flag)?;
    command.get(at + 1).map(String::as_str)
}

/// A plain `docker compose up` starts what it always did: Redis and the server, nothing of the
/// cluster profile.
#[test]
fn compose_default_up_is_unchanged() {
    let compose = compose();
    let expected: BTreeSet<String> = [REDIS_SERVICE, SERVER_SERVICE].map(String::from).into();
    assert_eq!(services_in(&compose, None), expected);
}

/// The cluster profile has six Redis nodes in cluster mode, each with a health check, its
/// node file on a volume of its own, and no published port.
#[test]
fn compose_cluster_profile_has_six_cluster_nodes() {
    let compose = compose();
    let profile = services_in(&compose, Some(CLUSTER_PROFILE));
    let mut volumes = BTreeSet::new();
    for name in CLUSTER_NODES {
        assert!(
            profile.contains(name),
            "{name} is not in the cluster profile"
        );
        let node = merged_service(&compose, name);
        let command = strings(&node["command"]);
        assert_eq!(command.first().map(String::as_str), Some("redis-server"));
        assert_eq!(
            flag_value(&command, "--cluster-enabled"),
            Some("yes"),
            "{name}"
        );
        let config = flag_value(&command, "--cluster-config-file").expect("a node file");
        assert!(
            config.starts_with("/data/"),
            "{name}: node file {config} off the volume"
        );
        let mounts = strings(&node["volumes"]);
        let [mount] = mounts.as_slice() else {
            panic!("{name}: one volume for /data, got {mounts:?}");
        };
        let (volume, path) = mount.split_once(':').expect("volume:path");
        assert_eq!(path, "/data", "{name}");
        assert!(
            volumes.insert(volume.to_owned()),
            "{name} shares volume {volume}"
        );
        assert!(
            !compose["volumes"][volume].is_badvalue(),
            "{name}: volume {volume} is not declared"
        );
        assert_eq!(
            strings(&node["healthcheck"]["test"]),
            ["CMD", "redis-cli", "ping"],
            "{name}"
        );
        assert!(node["ports"].is_badvalue(), "{name} is published");
    }
}

/// The init service waits for every node to be healthy, runs once, and its script creates a
/// cluster of the six nodes with one replica per primary.
#[test]
fn compose_cluster_init_joins_every_node() {
    let compose = compose();
    let init = merged_service(&compose, CLUSTER_INIT);
    assert!(strings(&init["profiles"]).contains(&CLUSTER_PROFILE.to_owned()));
    assert_eq!(init["restart"].as_str(), Some("no"), "a one-shot service");
    for node in CLUSTER_NODES {
        assert_eq!(
            init["depends_on"][node]["condition"].as_str(),
            Some("service_healthy"),
            "the init service does not wait for {node}"
        );
    }
    let script = init_script(&compose);
    for needed in ["--cluster create", "--cluster-replicas 1", "--cluster-yes"] {
        assert!(script.contains(needed), "the init script lacks {needed}");
    }
    for node in CLUSTER_NODES {
        assert!(script.contains(node), "the init script leaves out {node}");
    }
}

/// The init service's script, as its container runs it (compose turns `$$` into `$`).
fn init_script(compose: &Yaml) -> String {
    let init = merged_service(compose, CLUSTER_INIT);
    let entrypoint = strings(&init["entrypoint"]);
    let [shell, flag, script] = entrypoint.as_slice() else {
        panic!("{CLUSTER_INIT}'s entrypoint is not [shell, -c, script]: {entrypoint:?}");
    };
    assert_eq!((shell.as_str(), flag.as_str()), ("/bin/sh", "-c"));
    script.replace("$$", "$")
}

/// The two server replicas of the cluster profile point at every cluster node through
/// `CACHE_MONEY_REDIS_CLUSTER`, start once the cluster is formed, have the default server's
/// health check, and publish distinct loopback ports that do not clash with the default
/// server's.
#[test]
fn compose_cluster_servers_point_at_every_node() {
    let compose = compose();
    let default_server = service(&compose, SERVER_SERVICE);
    let mut published: BTreeSet<String> = strings(&default_server["ports"]).into_iter().collect();
    let nodes: BTreeSet<String> = CLUSTER_NODES.iter().map(|node| node.to_string()).collect();
    for name in CLUSTER_SERVERS {
        let server = merged_service(&compose, name);
        assert!(strings(&server["profiles"]).contains(&CLUSTER_PROFILE.to_owned()));
        assert_eq!(
            server["build"].as_str(),
            Some("."),
            "{name} runs this image"
        );
        let env = environment(&server);
        assert!(
            !env.iter().any(|(key, _)| key == "CACHE_MONEY_REDIS_URL"),
            "{name} is given a single Redis as well"
        );
        let seeds = env
            .iter()
            .find(|(key, _)| key == "CACHE_MONEY_REDIS_CLUSTER")
            .map(|(_, seeds)| seeds.clone())
            .unwrap_or_else(|| panic!("{name} is not given CACHE_MONEY_REDIS_CLUSTER"));
        let hosts: BTreeSet<String> = seeds
            .split(',')
            .map(|url| {
                let rest = url.strip_prefix("redis://").expect("redis:// seeds");
                let (host, port) = rest.split_once(':').expect("host:port");
                assert_eq!(port, "6379", "{url}");
                host.to_owned()
            })
            .collect();
        assert_eq!(hosts, nodes, "{name}'s seeds");
        assert_eq!(
            server["depends_on"][CLUSTER_INIT]["condition"].as_str(),
            Some("service_completed_successfully"),
            "{name} may start before the cluster is formed"
        );
        assert_eq!(
            server["healthcheck"], default_server["healthcheck"],
            "{name}'s health check differs from the default server's (tested against the binary)"
        );
        let ports = strings(&server["ports"]);
        assert!(!ports.is_empty(), "{name} publishes no port");
        for port in ports {
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name}: {port} beyond loopback"
            );
            assert!(
                port.ends_with(":50051"),
                "{name}: {port} misses the image's port"
            );
            assert!(published.insert(port.clone()), "{name}: {port} is taken");
        }
    }
}

/// The init script, run with `sh` as its container runs it, against six real `redis-server`s
/// in cluster mode (a stand-in `redis-cli` first on the `PATH` maps each node's compose name
/// to its loopback port): it forms a cluster of three primaries with a replica each, whose
/// state is `ok`, and a second run finds it formed and exits 0 without touching it.
#[test]
fn compose_cluster_init_script_forms_the_cluster() {
    let scratch = std::env::temp_dir().join(format!(
        "cache-money-cluster-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&scratch).unwrap();
    let nodes: Vec<common::RedisServer> = (1..=CLUSTER_NODES.len())
        .map(|n| {
            let config = scratch.join(format!("nodes-{n}.conf"));
            common::RedisServer::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                config.to_str().expect("a UTF-8 temporary folder"),
                "--cluster-node-timeout",
                "5000",
            ])
        })
        .collect();
    let real_cli = which("redis-cli");
    let mut shim = String::from("#!/bin/sh\n# redis-node-N is 127.0.0.1 on node N's port here.\n");
    shim.push_str("count=$#\nwhile [ \"$count\" -gt 0 ]; do\n  arg=$1; shift; count=$((count - 1))\n  case \"$arg\" in\n");
    for (name, node) in CLUSTER_NODES.iter().zip(&nodes) {
        shim.push_str(&format!(
            "    {name}) set -- \"$@\" 127.0.0.1 -p {} ;;\n",
            node.port()
        ));
    }
    shim.push_str("    *) set -- \"$@\" \"$arg\" ;;\n  esac\ndone\n");
    shim.push_str(&format!("exec {} \"$@\"\n", real_cli.display()));
    let shim_path = scratch.join("redis-cli");
    std::fs::write(&shim_path, shim).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&shim_path, std::fs::Permissions::from_mode(0o755)).unwrap();

    let path = format!(
        "{}:{}",
        scratch.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = init_script(&compose());
    let run = || {
        Command::new("sh")
            .args(["-c", &script])
            .env("PATH", &path)
            .output()
            .expect("run sh")
    };
    let cli = |node: &common::RedisServer, args: &[&str]| {
        let output = Command::new(&real_cli)
            .args(["-p", &node.port().to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };

    let formed = run();
    assert!(
        formed.status.success(),
        "the init script failed: {}\n{}",
        String::from_utf8_lossy(&formed.stdout),
        String::from_utf8_lossy(&formed.stderr)
    );
    // Roles reach every node by gossip: poll until node 1 sees them all, or give up.
    let roles = |node: &common::RedisServer| {
        let nodes = cli(node, &["cluster", "nodes"]);
        let count = |role: &str| {
            nodes
                .lines()
                .filter(|line| {
                    line.split(' ')
                        .nth(2)
                        .is_some_and(|flags| flags.contains(role))
                })
                .count()
        };
        (count("master"), count("slave"), nodes)
    };
    let deadline = std::time::Instant::now() + common::READY_TIMEOUT;
    loop {
        let (primaries, replicas, table) = roles(&nodes[0]);
        let ok = cli(&nodes[0], &["cluster", "info"]).contains("cluster_state:ok");
        if ok && (primaries, replicas) == (3, 3) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no cluster of 3 primaries and 3 replicas in state ok (ok: {ok}):\n{table}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let again = run();
    assert!(again.status.success(), "{again:?}");
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("already formed"),
        "{again:?}"
    );
    drop(nodes);
    let _ = std::fs::remove_dir_all(&scratch);
}

/// The full path of `program` on the `PATH`.
fn which(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| panic!("{program} is not on the PATH (it comes with redis-server)"))
}
