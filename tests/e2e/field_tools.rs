//! The installer's tools: config errors in the user's words, `probe`,
//! `check-config --test` and `tail`.

use std::process::Command;

fn tsgw(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tsgw"));
    command.args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().expect("tsgw runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const VALID: &str = r#"[upstream]
client_id = "c"
username = "u"
password = "very-secret-password"
[queue]
dir = "/tmp/tsgw-never-opened"
"#;

fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path.display().to_string())
}

#[test]
fn a_bad_environment_value_names_the_variable_as_typed() {
    let (_dir, path) = config_file(VALID);
    let (ok, _, stderr) = tsgw(
        &["check-config", "--config", &path],
        &[("TSGW_UPSTREAM__UPDATE_INTERVAL_SECS", "soon")],
    );
    assert!(!ok);
    assert!(
        stderr.contains(
            "environment variable TSGW_UPSTREAM__UPDATE_INTERVAL_SECS: \
             \"upstream.update_interval_secs\" must be a number, found string \"soon\""
        ),
        "{stderr}"
    );
}

#[test]
fn a_file_error_names_the_key_without_a_profile_and_gives_the_line() {
    let (_dir, path) = config_file(&format!("{VALID}bogus_key = 3\n"));
    let (ok, _, stderr) = tsgw(&["check-config", "--config", &path], &[]);
    assert!(!ok);
    assert!(!stderr.contains("default."), "{stderr}");
    assert!(
        stderr.contains(&format!("{path}, line 7: unknown key \"queue.bogus_key\"")),
        "{stderr}"
    );
}
