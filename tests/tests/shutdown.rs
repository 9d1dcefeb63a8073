//! `hs-main serve` stopped by a service manager (SIGTERM) or Ctrl-C (SIGINT):
//! it answers what it acknowledged, stops its background jobs, closes the
//! database and exits 0. On SQLite, a database closed by its last connection
//! has its write-ahead log checkpointed and removed with the shared-memory
//! file: nothing is left beside it.

use e2e_tests::*;
use std::process::Command;

#[test]
fn serve_stopped_by_a_signal_closes_its_sqlite_database() {
    for signal in ["TERM", "INT"] {
        let dir = TempDir(tempdir(&format!("shutdown-{signal}")));
        let file = dir.0.join("x.db");
        let url = format!("sqlite:{}", file.display());
        let port = free_port();
        let args: Vec<String> = vec![
            "--database".into(),
            url.clone(),
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ];
        let mut main = start("hs-main", &args, port);
        let (_, acknowledged) = founded_room(&main.url);
        assert!(
            file.with_extension("db-wal").exists(),
            "the server writes through a write-ahead log"
        );

        let kill = Command::new("kill")
            .args([&format!("-{signal}"), &main.child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let status = wait_for_exit(&mut main);
        assert!(
            status.success(),
            "hs-main after SIG{signal}: {status}\n{}",
            main.log_text()
        );
        // Before anything else opens the database again.
        for beside in ["db-wal", "db-shm"] {
            assert!(
                !file.with_extension(beside).exists(),
                "SIG{signal} left x.{beside} beside the database:\n{}",
                main.log_text()
            );
        }
        assert_all_stored(&url, &acknowledged);
    }
}
