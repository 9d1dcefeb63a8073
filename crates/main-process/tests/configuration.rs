//! The configuration file as an operator meets it: a typo in a key fails
//! naming the file, line and key; a Synapse `homeserver.yaml` opens the
//! database its `database:` section names (`psycopg2` on PostgreSQL,
//! `sqlite3` on SQLite); libpq keyword strings and bare SQLite paths open the
//! same database as its URL; `config check` hides secrets.

use e2e_tests::{hs_main, hs_main_output, status_and_text, tempdir, TempDir};
use storage_core::testing::TestDb;
use storage_core::DatabaseUrl;

storage_core::engine_tests!(
    a_synapse_homeserver_yaml_opens_its_database,
    every_form_of_database_string_opens_the_same_database,
    every_command_opens_with_the_configured_pool_and_cache_sizes
);

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/example-room.jsonl"
);
const ROOM: &str = "!example:example.org";

/// `hs-main ARGS...` without a database argument: (status, stdout, stderr).
fn bare(args: &[&str]) -> (i32, String, String) {
    status_and_text(hs_main_output(args))
}

/// The parts of a PostgreSQL test URL (`postgres://USER@HOST/DB?host=DIR...`)
/// that a psycopg2 section or a keyword string names.
struct PgParts {
    user: String,
    host: String,
    dbname: String,
    port: Option<String>,
}

fn pg_parts(url: &str) -> PgParts {
    let rest = url.split_once("://").unwrap().1;
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, dbname) = main.split_once('/').unwrap();
    let (user, hostport) = authority.split_once('@').unwrap_or(("postgres", authority));
    let user = user.split(':').next().unwrap().to_owned();
    let (mut host, mut port) = match hostport.split_once(':') {
        Some((h, p)) => (h.to_owned(), Some(p.to_owned())),
        None => (hostport.to_owned(), None),
    };
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("host", h)) => host = h.replace("%2F", "/"),
            Some(("port", p)) => port = Some(p.to_owned()),
            _ => {}
        }
    }
    PgParts {
        user,
        host,
        dbname: dbname.to_owned(),
        port,
    }
}

/// The room's current state as `hs-main state` prints it from `args`' database.
fn state_with(args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.extend(["state", ROOM]);
    let (code, out, err) = bare(&all);
    assert_eq!(code, 0, "{all:?}: {err}");
    assert!(out.contains("m.room.create"), "{out}");
    out
}

fn imported(t: &TestDb) -> String {
    let (code, _, err) = hs_main(t, &["import", FIXTURE]);
    assert_eq!(code, 0, "{err}");
    state_with(&["--database", t.url()])
}

fn a_synapse_homeserver_yaml_opens_its_database(t: &TestDb) {
    let expected = imported(t);
    let dir = TempDir(tempdir("homeserver-yaml"));
    let section = match DatabaseUrl::parse(t.url()).unwrap() {
        DatabaseUrl::Sqlite(path) => format!(
            "database:\n  name: sqlite3\n  args:\n    database: {}\n",
            path.display()
        ),
        DatabaseUrl::Postgres(url) => {
            let p = pg_parts(&url);
            let port = p
                .port
                .map(|p| format!("    port: {p}\n"))
                .unwrap_or_default();
            format!(
                "database:\n  name: psycopg2\n  txn_limit: 10000\n  args:\n    user: {}\n    \
                 database: {}\n    host: {}\n{port}    cp_min: 1\n    cp_max: 3\n",
                p.user, p.dbname, p.host
            )
        }
    };
    // Synapse's own keys around it are not ours, and are not read.
    let yaml = format!(
        "server_name: example.org\npid_file: /data/homeserver.pid\nlisteners:\n  - port: 8008\n    \
         type: http\n{section}media_store_path: /data/media_store\n"
    );
    let path = dir.0.join("homeserver.yaml");
    std::fs::write(&path, yaml).unwrap();
    let config = path.to_str().unwrap();
    assert_eq!(state_with(&["--config", config]), expected);
    let (code, out, err) = bare(&["--config", config, "config", "check"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Synapse configuration"), "{out}");
    if t.engine() == "postgres" {
        assert!(out.contains("pool_size: 3"), "cp_max sizes the pool: {out}");
    }
    // Flags win over the file: the flag's database (not created) is the one opened.
    let other = TestDb::sqlite();
    let other_path = other.url().trim_start_matches("sqlite:");
    let (code, _, err) = bare(&["--config", config, "--database", other.url(), "state", ROOM]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(other_path),
        "the flag's database was opened: {err}"
    );
}

fn every_form_of_database_string_opens_the_same_database(t: &TestDb) {
    let expected = imported(t);
    let forms = match DatabaseUrl::parse(t.url()).unwrap() {
        DatabaseUrl::Sqlite(path) => vec![path.display().to_string()],
        DatabaseUrl::Postgres(url) => {
            let p = pg_parts(&url);
            let port = p.port.map(|p| format!(" port={p}")).unwrap_or_default();
            vec![format!(
                "host={} dbname={} user='{}'{port}",
                p.host, p.dbname, p.user
            )]
        }
    };
    for form in forms {
        assert_eq!(state_with(&["--database", &form]), expected, "{form}");
        // ... and the same from a configuration file of ours.
        let dir = TempDir(tempdir("database-forms"));
        let path = dir.0.join("hs.yaml");
        std::fs::write(&path, format!("database: {form:?}\n")).unwrap();
        assert_eq!(state_with(&["--config", path.to_str().unwrap()]), expected);
    }
}

/// `pool_size` and `caches.global_factor` of the file reach every command,
/// not only `serve`: each one, run with `-v`, logs the pool it opened and the
/// bound of every cache its stores made, and those are the file's.
fn every_command_opens_with_the_configured_pool_and_cache_sizes(t: &TestDb) {
    let dir = TempDir(tempdir("command-settings"));
    let config = dir.0.join("hs.yaml");
    // 3 connections is neither engine's default (4, 10); at 1/10,000 every
    // cache's bound (defaults 10,000 to 500,000) is at most 50.
    std::fs::write(
        &config,
        format!(
            "database: {:?}\npool_size: 3\ncaches:\n  global_factor: 0.0001\n",
            t.url()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let port_target = TestDb::sqlite();
    let commands: Vec<(Vec<&str>, bool)> = vec![
        (vec!["migrate"], true),
        (vec!["import", FIXTURE], true),
        (vec!["state", ROOM], true),
        (vec!["inspect", "--exact"], true),
        (vec!["compress"], true),
        (vec!["purge-state-groups", "--dry-run"], true),
        (vec!["port", "--to", port_target.url()], true),
    ];
    for (command, has_caches) in commands {
        let mut args = vec!["--config", config, "-v"];
        args.extend(&command);
        let (code, _, err) = bare(&args);
        assert_eq!(code, 0, "{command:?}: {err}");
        let pools: Vec<&str> = err.lines().filter(|l| l.contains(": a pool of ")).collect();
        assert!(!pools.is_empty(), "{command:?} logged no pool: {err}");
        for line in &pools {
            assert!(
                line.contains("a pool of 3 connections"),
                "{command:?} did not take pool_size: {line}"
            );
        }
        let bounds: Vec<u64> = err
            .lines()
            .filter_map(|l| l.split_once(" storage_core::cache::lru: cache "))
            .map(|(_, rest)| rest)
            .filter_map(|rest| rest.rsplit_once(": at most "))
            .map(|(_, n)| n.trim().parse().unwrap())
            .collect();
        assert_eq!(!bounds.is_empty(), has_caches, "{command:?}: {err}");
        assert!(
            bounds.iter().all(|&b| b <= 50),
            "{command:?} did not take caches.global_factor: {bounds:?}"
        );
    }
}

/// A relative SQLite path in a file of ours is relative to the file's folder,
/// whatever folder the command runs in; in a Synapse homeserver.yaml it is
/// relative to the folder the command runs in, as for Synapse, and without a
/// `database:` section its `database_path` names the file (as for Synapse).
#[test]
fn relative_paths_follow_the_file_kind_and_database_path_is_read() {
    let dir = TempDir(tempdir("relative-paths"));
    let (conf, elsewhere) = (dir.0.join("conf"), dir.0.join("elsewhere"));
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let ours = conf.join("hs.yaml");
    std::fs::write(&ours, "database: sqlite:data/hs.db\n").unwrap();
    let in_folder = |folder: &std::path::Path, args: &[&str]| {
        status_and_text(
            e2e_tests::hs_main_command()
                .current_dir(folder)
                .args(args)
                .output()
                .unwrap(),
        )
    };
    let ours = ours.to_str().unwrap();
    let (code, _, err) = in_folder(&elsewhere, &["--config", ours, "import", FIXTURE]);
    assert_eq!(code, 0, "{err}");
    assert!(conf.join("data/hs.db").exists(), "beside the file: {err}");
    assert!(
        !elsewhere.join("data").exists(),
        "not in the working folder"
    );
    let expected = state_with(&["--config", ours]);

    // A homeserver.yaml with only `database_path`, relative: from the folder
    // the command runs in.
    let homeserver = dir.0.join("homeserver.yaml");
    std::fs::write(
        &homeserver,
        "server_name: example.org\ndatabase_path: data/hs.db\n",
    )
    .unwrap();
    let homeserver = homeserver.to_str().unwrap();
    let (code, out, err) = in_folder(&conf, &["--config", homeserver, "state", ROOM]);
    assert_eq!((code, out), (0, expected), "{err}");
    let (code, _, err) = in_folder(&elsewhere, &["--config", homeserver, "state", ROOM]);
    assert_ne!(code, 0, "no database in the working folder: {err}");
    std::fs::write(dir.0.join("homeserver.yaml"), "server_name: example.org\n").unwrap();
    let (code, _, err) = bare(&["--config", homeserver, "state", ROOM]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("No database config provided"), "{err}");
}

#[test]
fn an_unknown_or_ill_typed_key_fails_naming_file_line_and_key() {
    let dir = TempDir(tempdir("bad-config"));
    let path = dir.0.join("hs.yaml");
    let file = path.to_str().unwrap();
    for (yaml, line, key) in [
        (
            "listen: 127.0.0.1:8018\nlog:\n  filter: info\n  colour: true\n",
            "line 4",
            "colour",
        ),
        ("pool_size: 4\ndatabse: sqlite:x.db\n", "line 2", "databse"),
        (
            "caches:\n  global_factor: lots\n",
            "line 2",
            "caches.global_factor",
        ),
        (
            "http:\n  header_timeout: 10\n  max_connections: -3\n",
            "line 3",
            "http.max_connections",
        ),
    ] {
        std::fs::write(&path, yaml).unwrap();
        for command in [vec!["config", "check"], vec!["state", ROOM]] {
            let mut args = vec!["--config", file];
            args.extend(&command);
            let (code, _, err) = bare(&args);
            assert_eq!(code, 1, "{yaml}: {err}");
            assert!(err.contains(file), "names the file: {err}");
            assert!(err.contains(line), "names the line: {err}");
            assert!(err.contains(key), "names the key: {err}");
        }
    }
}

#[test]
fn config_check_prints_the_settings_in_force_without_secrets() {
    let dir = TempDir(tempdir("config-check"));
    let token = dir.0.join("token");
    std::fs::write(&token, "t0ken-value\n").unwrap();
    let path = dir.0.join("hs.yaml");
    std::fs::write(
        &path,
        format!(
            "database: postgres://alice:s3cret@db.example/hs\nlisten: 127.0.0.1:8018\n\
             api_token_file: {}\ncaches:\n  global_factor: 2\n",
            token.display()
        ),
    )
    .unwrap();
    let (code, out, err) = bare(&["--config", path.to_str().unwrap(), "config", "check"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("postgres://alice:***@db.example/hs"), "{out}");
    assert!(
        !out.contains("s3cret") && !out.contains("t0ken-value"),
        "{out}"
    );
    assert!(out.contains("listen: \"127.0.0.1:8018\""), "{out}");
    assert!(out.contains("global_factor: 2"), "{out}");
    let (_, out, _) = bare(&["--config", path.to_str().unwrap(), "config", "--help"]);
    assert!(out.contains("docs/"), "--help points at the docs: {out}");
    let out = e2e_tests::hs_main_command()
        .args(["--config", path.to_str().unwrap(), "config", "check"])
        .env("HS_DATABASE", "sqlite:/tmp/from-env.db")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("sqlite:/tmp/from-env.db"),
        "the environment wins: {out}"
    );
}

/// `--help` of every command says where its reference is.
#[test]
fn every_command_help_points_at_the_docs() {
    let (_, top, _) = bare(&["--help"]);
    let commands: Vec<String> = top
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect();
    assert!(commands.len() >= 9, "{top}");
    assert!(top.contains("docs/cli.md"), "{top}");
    for command in &commands {
        let (code, help, err) = bare(&[command, "--help"]);
        assert_eq!(code, 0, "{command}: {err}");
        assert!(help.contains("docs/"), "{command} --help: {help}");
    }
    let out = e2e_tests::hs_main_command()
        .args(["import", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("<FILES>") && help.contains("`.gz`"), "{help}");
}

/// `-q` leaves warnings only, `-v` adds debug lines, and `RUST_LOG=debug`
/// raises our crates without bringing back ruma's per-check lines, which
/// come back only when named.
#[test]
fn log_levels_follow_flags_and_rust_log_keeps_third_party_quiet() {
    let dir = TempDir(tempdir("log-levels"));
    let run = |db: &str, args: &[&str], rust_log: Option<&str>| {
        let mut c = e2e_tests::hs_main_command();
        c.arg("--database").arg(db).args(args);
        match rust_log {
            Some(v) => c.env("RUST_LOG", v),
            None => c.env_remove("RUST_LOG"),
        };
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let db = |name: &str| format!("sqlite:{}", dir.0.join(name).display());
    let quiet = run(&db("q.db"), &["-q", "import", FIXTURE], None);
    assert!(!quiet.contains(" INFO "), "-q: {quiet}");
    let normal = run(&db("n.db"), &["import", FIXTURE], None);
    assert!(normal.contains(" INFO "), "{normal}");
    assert!(!normal.contains(" DEBUG "), "{normal}");
    let verbose = run(&db("v.db"), &["-v", "import", FIXTURE], None);
    assert!(verbose.contains(" DEBUG "), "-v: {verbose}");
    let ruma = |text: &str| text.lines().filter(|l| l.contains("] ruma")).count();
    let debug = run(&db("d.db"), &["import", FIXTURE], Some("debug"));
    assert!(debug.contains(" DEBUG "), "RUST_LOG=debug: {debug}");
    assert_eq!(
        ruma(&debug),
        0,
        "RUST_LOG=debug let ruma's lines through: {debug}"
    );
    let named = run(
        &db("r.db"),
        &["import", FIXTURE],
        Some("debug,ruma_state_res=debug,ruma=debug"),
    );
    assert!(
        ruma(&named) > 0,
        "naming ruma brings its lines back: {named}"
    );
}
