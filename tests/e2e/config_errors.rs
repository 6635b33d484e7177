//! A bad config is a clear error and a non-zero exit, never a half-started gateway.

use crate::common::{config_file, run_tsgw, MINIMAL_CONFIG};

#[test]
fn check_config_prints_the_config_with_secrets_masked() {
    let (_dir, path) = config_file(MINIMAL_CONFIG);
    let (ok, stdout, stderr) = run_tsgw(&["check-config", "--config", &path], &[]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("[upstream]"), "{stdout}");
    assert!(!stdout.contains("very-secret-password"), "{stdout}");
    assert!(stdout.contains("********"));
}

#[test]
fn an_unknown_key_is_named_with_its_file() {
    let (_dir, path) = config_file(&format!(
        "{MINIMAL_CONFIG}\n[mqtt]\nlisten = \"127.0.0.1:0\"\nmax_payload = 5\n"
    ));
    for command in ["check-config", "run"] {
        let (ok, _, stderr) = run_tsgw(&[command, "--config", &path], &[]);
        assert!(!ok, "{command} accepted an unknown key");
        assert!(stderr.contains("max_payload"), "{command}: {stderr}");
        assert!(stderr.contains("gateway.toml"), "{command}: {stderr}");
    }
}

#[test]
fn a_bad_value_names_the_key() {
    let (_dir, path) = config_file(&format!("{MINIMAL_CONFIG}\n[[mqtt.rules]]\nname = \"r\"\ntopic = \"a/#/b\"\nchannel = 1\nparser = {{ format = \"plain\", target = \"field1\" }}\n"));
    let (ok, _, stderr) = run_tsgw(&["check-config", "--config", &path], &[]);
    assert!(!ok);
    assert!(stderr.contains("mqtt.rules[0]"), "{stderr}");
}

#[test]
fn a_missing_config_file_is_an_error() {
    let (ok, _, stderr) = run_tsgw(&["run", "--config", "/nonexistent/tsgw.toml"], &[]);
    assert!(!ok);
    assert!(stderr.contains("/nonexistent/tsgw.toml"), "{stderr}");
}

#[test]
fn environment_variables_override_keys_and_errors_name_them() {
    let (_dir, path) = config_file(MINIMAL_CONFIG);
    let (ok, stdout, stderr) = run_tsgw(
        &["check-config", "--config", &path],
        &[
            ("TSGW_QUEUE__DIR", "/srv/tsgw-queue"),
            ("TSGW_UPSTREAM__PASSWORD", "from-env-secret"),
        ],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("/srv/tsgw-queue"), "{stdout}");
    assert!(!stdout.contains("from-env-secret"));

    let (ok, _, stderr) = run_tsgw(
        &["check-config", "--config", &path],
        &[("TSGW_QUEUE__MAX_BYTES", "lots")],
    );
    assert!(!ok);
    assert!(
        stderr.to_lowercase().contains("queue.max_bytes") && stderr.contains("TSGW_"),
        "{stderr}"
    );
}

#[test]
fn systemd_credentials_set_keys() {
    let (_dir, path) = config_file(MINIMAL_CONFIG);
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(
        creds.path().join("upstream.username"),
        "user-from-credential\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = run_tsgw(
        &["check-config", "--config", &path],
        &[("CREDENTIALS_DIRECTORY", creds.path().to_str().unwrap())],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("user-from-credential"), "{stdout}");
}

#[test]
fn a_value_the_checks_refuse_names_the_file_and_line_of_its_table() {
    // MINIMAL_CONFIG is 6 lines; the [[serial]] entry starts on line 7.
    let (_dir, path) = config_file(&format!(
        "{MINIMAL_CONFIG}[[serial]]\nname = \"a\"\npath = \"/dev/ttyUSB0\"\nchannel = 1\nbaud = 0\n\
         parser = {{ format = \"plain\", target = \"field1\" }}\n"
    ));
    let (ok, _, stderr) = run_tsgw(&["check-config", "--config", &path], &[]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "{path}, line 7: invalid [[serial]] #1 (\"a\"): serial port \"a\": baud: must be greater than 0"
        )),
        "{stderr}"
    );
}
