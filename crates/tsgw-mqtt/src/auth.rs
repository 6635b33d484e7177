//! Who a connecting device is: accounts, password checks, anonymous clients.
//!
//! The front authenticates every CONNECT itself (rumqttd runs without auth on
//! loopback). Anonymous clients, as in mosquitto 2.x, need
//! `allow_anonymous = true`, except on a loopback listener of a gateway
//! that has no accounts at all (local tools, tests, the demo).

use std::collections::HashMap;
use std::sync::Arc;

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, SaltString};
use argon2::{Argon2, PasswordVerifier};
use tokio::sync::Semaphore;
use tsgw_core::Secret;

use crate::acl::{Acl, AclError};
use crate::config::MqttSourceConfig;

/// The `user` label and log name of clients without an account.
pub const ANONYMOUS: &str = "anonymous";

/// A connected client's identity and permissions.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The account name; `None` for an anonymous client.
    pub user: Option<String>,
    pub acl: Arc<Acl>,
}

impl Identity {
    /// The account name, or `anonymous`.
    pub fn name(&self) -> &str {
        self.user.as_deref().unwrap_or(ANONYMOUS)
    }
}

/// Why a CONNECT was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A username no account has.
    UnknownUser,
    /// The account exists; the password is wrong.
    BadPassword,
    /// No credentials, on a listener that does not admit anonymous clients.
    Anonymous,
}

impl Refusal {
    /// The CONNACK return code (MQTT 3.1.1 §3.2.2.3).
    pub fn connack_code(self) -> u8 {
        match self {
            Refusal::UnknownUser | Refusal::BadPassword => 4, // bad user name or password
            Refusal::Anonymous => 5,                          // not authorized
        }
    }

    /// The `reason` label.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::UnknownUser => "unknown_user",
            Refusal::BadPassword => "bad_password",
            Refusal::Anonymous => "anonymous",
        }
    }
}

#[derive(Debug)]
enum PasswordCheck {
    Plain(Secret),
    /// An argon2 PHC string (`$argon2id$...`), checked as such. Kept as a
    /// secret too: a hash in a log invites offline guessing.
    Hash(Secret),
}

#[derive(Debug)]
struct Account {
    password: PasswordCheck,
    acl: Arc<Acl>,
}

/// The accounts of `[mqtt.users]` and the anonymous policy, compiled.
#[derive(Debug, Default)]
pub struct Accounts {
    users: HashMap<String, Account>,
    anonymous: Arc<Acl>,
    allow_anonymous: bool,
}

/// An account whose password hash or ACL cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AccountError {
    #[error("mqtt.users.{user}.password: looks like a password hash but is not a valid argon2 PHC string ({reason}); make one with `tsgw passwd`")]
    BadHash { user: String, reason: String },
    #[error("mqtt.users.{user}: the password is empty")]
    EmptyPassword { user: String },
    #[error(transparent)]
    Acl(#[from] AclError),
}

/// Password checks are deliberately expensive (memory and CPU): at most this
/// many run at once, so a burst of connects cannot take the box's memory.
const CONCURRENT_HASH_CHECKS: usize = 2;

static HASH_CHECKS: Semaphore = Semaphore::const_new(CONCURRENT_HASH_CHECKS);

impl Accounts {
    pub fn compile(config: &MqttSourceConfig) -> Result<Accounts, AccountError> {
        let mut users = HashMap::new();
        for (name, user) in &config.users {
            let secret = user.password();
            if secret.is_empty() {
                return Err(AccountError::EmptyPassword { user: name.clone() });
            }
            let password = if secret.expose().starts_with("$argon2") {
                valid_phc(secret.expose()).map_err(|reason| AccountError::BadHash {
                    user: name.clone(),
                    reason,
                })?;
                PasswordCheck::Hash(secret.clone())
            } else {
                PasswordCheck::Plain(secret.clone())
            };
            let acl = Acl::compile(&user.acl(), &format!("mqtt.users.{name}"))?;
            users.insert(
                name.clone(),
                Account {
                    password,
                    acl: Arc::new(acl),
                },
            );
        }
        Ok(Accounts {
            users,
            anonymous: Arc::new(Acl::compile(&config.anonymous, "mqtt.anonymous")?),
            allow_anonymous: config.allow_anonymous,
        })
    }

    /// Checks a CONNECT's credentials. `loopback` is whether the listener is
    /// bound to a loopback address.
    pub async fn authenticate(
        &self,
        login: Option<(&str, &str)>,
        loopback: bool,
    ) -> Result<Identity, Refusal> {
        let anonymous = || {
            if self.allow_anonymous || (loopback && self.users.is_empty()) {
                Ok(Identity {
                    user: None,
                    acl: self.anonymous.clone(),
                })
            } else {
                Err(Refusal::Anonymous)
            }
        };
        // Without accounts there is nothing to check credentials against: the
        // client is anonymous whatever it sends (mosquitto does the same).
        let Some((username, password)) = login.filter(|_| !self.users.is_empty()) else {
            return anonymous();
        };
        let Some(account) = self.users.get(username) else {
            return Err(Refusal::UnknownUser);
        };
        let matches = match &account.password {
            PasswordCheck::Plain(expected) => {
                constant_time_eq(expected.expose().as_bytes(), password.as_bytes())
            }
            PasswordCheck::Hash(phc) => {
                verify_hash(phc.expose().to_owned(), password.to_owned()).await
            }
        };
        if matches {
            Ok(Identity {
                user: Some(username.to_owned()),
                acl: account.acl.clone(),
            })
        } else {
            Err(Refusal::BadPassword)
        }
    }
}

/// Whether `phc` is a complete argon2 hash (algorithm, parameters, salt and
/// hash), so that a truncated paste fails at startup, not at every CONNECT.
fn valid_phc(phc: &str) -> Result<(), String> {
    let hash = PasswordHash::new(phc).map_err(|e| e.to_string())?;
    argon2::Algorithm::try_from(hash.algorithm).map_err(|e| e.to_string())?;
    argon2::Params::try_from(&hash).map_err(|e| e.to_string())?;
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err("salt or hash missing".into());
    }
    Ok(())
}

/// Checks a password against an argon2 PHC string off the async threads.
async fn verify_hash(phc: String, password: String) -> bool {
    let Ok(_permit) = HASH_CHECKS.acquire().await else {
        return false;
    };
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&phc)
            .map(|hash| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &hash)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

/// Compares without an early exit, so the time taken does not tell how much
/// of a guessed password was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Hashes a password for `[mqtt.users]` or `[http.users]` (what `tsgw passwd`
/// prints): argon2id with 9 MiB of memory and 4 passes (one of OWASP's
/// recommended settings), light enough to check on a Pi Zero in well under a
/// second.
pub fn hash_password(password: &str) -> Result<String, String> {
    let params = argon2::Params::new(9 * 1024, 4, 1, None).map_err(|e| e.to_string())?;
    let hasher = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::generate(&mut OsRng);
    hasher
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| e.to_string())
}

/// Checks a password against a `[mqtt.users]`-style value: a PHC string made
/// by [`hash_password`], or a plain password.
pub async fn check_password(stored: &Secret, password: &str) -> bool {
    if stored.expose().starts_with("$argon2") {
        verify_hash(stored.expose().to_owned(), password.to_owned()).await
    } else {
        constant_time_eq(stored.expose().as_bytes(), password.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accounts(toml_text: &str) -> Accounts {
        Accounts::compile(&toml::from_str(toml_text).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn plain_and_hashed_passwords() {
        let hash = hash_password("s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        let accounts = accounts(&format!(
            "[users]\nesp = \"pw\"\n[users.plc]\npassword = \"{hash}\"\nchannels = [42]\n"
        ));
        let esp = accounts
            .authenticate(Some(("esp", "pw")), false)
            .await
            .unwrap();
        assert_eq!(esp.name(), "esp");
        let plc = accounts
            .authenticate(Some(("plc", "s3cret")), false)
            .await
            .unwrap();
        assert!(plc
            .acl
            .may_publish_channel(thingspeak::ChannelId::new(42).unwrap()));
        assert!(!plc
            .acl
            .may_publish_channel(thingspeak::ChannelId::new(43).unwrap()));
        assert_eq!(
            accounts
                .authenticate(Some(("plc", "wrong")), false)
                .await
                .unwrap_err(),
            Refusal::BadPassword
        );
        assert_eq!(
            accounts
                .authenticate(Some(("nobody", "pw")), true)
                .await
                .unwrap_err(),
            Refusal::UnknownUser
        );
    }

    #[tokio::test]
    async fn anonymous_clients_need_loopback_or_permission() {
        let closed = accounts("");
        assert_eq!(
            closed.authenticate(None, false).await.unwrap_err(),
            Refusal::Anonymous
        );
        // Credentials mean nothing without accounts: still anonymous.
        assert_eq!(
            closed
                .authenticate(Some(("x", "y")), false)
                .await
                .unwrap_err(),
            Refusal::Anonymous
        );
        assert!(closed
            .authenticate(None, true)
            .await
            .unwrap()
            .user
            .is_none());
        // Once accounts exist, loopback is no excuse.
        assert_eq!(
            accounts("[users]\nesp = \"pw\"")
                .authenticate(None, true)
                .await
                .unwrap_err(),
            Refusal::Anonymous
        );
        let open = accounts("allow_anonymous = true");
        assert_eq!(
            open.authenticate(None, false).await.unwrap().name(),
            "anonymous"
        );
        assert_eq!(Refusal::Anonymous.connack_code(), 5);
        assert_eq!(Refusal::BadPassword.connack_code(), 4);
    }

    #[test]
    fn a_broken_hash_is_a_config_error_naming_the_user() {
        let err =
            Accounts::compile(&toml::from_str("[users]\nplc = \"$argon2id$garbage\"\n").unwrap())
                .unwrap_err();
        assert!(err.to_string().contains("mqtt.users.plc.password"), "{err}");
        let good = hash_password("x").unwrap();
        let truncated = &good[..good.len() - 10];
        assert!(Accounts::compile(
            &toml::from_str(&format!("[users]\nplc = \"{truncated}\"\n")).unwrap()
        )
        .is_err());
        let ok =
            Accounts::compile(&toml::from_str(&format!("[users]\nplc = \"{good}\"\n")).unwrap())
                .unwrap();
        assert!(!format!("{ok:?}").contains("argon2"), "{ok:?}");
    }

    #[tokio::test]
    async fn check_password_takes_both_forms() {
        let hash = Secret::new(hash_password("a").unwrap());
        assert!(check_password(&hash, "a").await);
        assert!(!check_password(&hash, "b").await);
        assert!(check_password(&Secret::new("a"), "a").await);
        assert!(!check_password(&Secret::new("a"), "ab").await);
    }
}
