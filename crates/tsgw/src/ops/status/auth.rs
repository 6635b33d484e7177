//! `http.users`: HTTP Basic authentication for the status page and the tail
//! feed, with the same password format as `[mqtt.users]` (an argon2 PHC
//! string from `tsgw passwd`, or a plain password), so one `tsgw passwd`
//! line works in both places. With no users, the page is open: keep the
//! listener on loopback then.

use std::collections::BTreeMap;

use argon2::password_hash::PasswordHash;
use axum::http::HeaderValue;
use base64::Engine;
use tsgw_core::Secret;

/// Why a request was refused; the `reason` label of `tsgw_http_denied_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Basic` header (a browser's first request).
    NoCredentials,
    /// A header that is not valid Basic credentials.
    Malformed,
    UnknownUser,
    BadPassword,
}

impl Denied {
    pub fn reason(self) -> &'static str {
        match self {
            Denied::NoCredentials => "no_credentials",
            Denied::Malformed => "malformed",
            Denied::UnknownUser => "unknown_user",
            Denied::BadPassword => "bad_password",
        }
    }
}

/// The accounts allowed to look.
#[derive(Debug, Clone, Default)]
pub struct Users {
    users: BTreeMap<String, Secret>,
}

impl Users {
    pub fn new(users: BTreeMap<String, Secret>) -> Self {
        Self { users }
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Checks every password entry; errors name the key.
    pub fn validate(users: &BTreeMap<String, Secret>) -> Result<(), String> {
        for (name, password) in users {
            if name.is_empty() || name.contains(':') {
                return Err(format!(
                    "http.users: the user name {name:?} cannot be used (empty, or contains ':')"
                ));
            }
            if password.is_empty() {
                return Err(format!("http.users.{name}: the password is empty"));
            }
            if password.expose().starts_with("$argon2") {
                valid_phc(password.expose()).map_err(|reason| {
                    format!(
                        "http.users.{name}: looks like a password hash but is not a valid argon2 PHC string ({reason}); make one with `tsgw passwd {name}`"
                    )
                })?;
            }
        }
        Ok(())
    }

    /// Checks an `Authorization` header; `Ok` with the user name.
    pub async fn check(&self, header: Option<&HeaderValue>) -> Result<String, Denied> {
        let (user, password) = credentials(header)?;
        let Some(stored) = self.users.get(&user) else {
            return Err(Denied::UnknownUser);
        };
        if tsgw_mqtt::auth::check_password(stored, &password).await {
            Ok(user)
        } else {
            Err(Denied::BadPassword)
        }
    }
}

/// The user and password of `Authorization: Basic <base64(user:password)>`.
fn credentials(header: Option<&HeaderValue>) -> Result<(String, String), Denied> {
    let header = header.ok_or(Denied::NoCredentials)?;
    let text = header.to_str().map_err(|_| Denied::Malformed)?;
    let (scheme, encoded) = text.trim().split_once(' ').ok_or(Denied::Malformed)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(Denied::NoCredentials);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| Denied::Malformed)?;
    let decoded = String::from_utf8(decoded).map_err(|_| Denied::Malformed)?;
    let (user, password) = decoded.split_once(':').ok_or(Denied::Malformed)?;
    Ok((user.to_owned(), password.to_owned()))
}

/// The header value a client sends for `user` and `password`.
pub fn basic_header(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A complete argon2 hash (algorithm, parameters, salt, hash), so a truncated
/// paste fails at startup rather than at every request.
fn valid_phc(phc: &str) -> Result<(), String> {
    let hash = PasswordHash::new(phc).map_err(|e| e.to_string())?;
    argon2::Algorithm::try_from(hash.algorithm).map_err(|e| e.to_string())?;
    argon2::Params::try_from(&hash).map_err(|e| e.to_string())?;
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err("salt or hash missing".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(value: &str) -> HeaderValue {
        HeaderValue::from_str(value).unwrap()
    }

    #[tokio::test]
    async fn hashed_and_plain_passwords() {
        let hash = tsgw_mqtt::auth::hash_password("s3cret").unwrap();
        let users = Users::new(
            [
                ("ops".to_owned(), Secret::new(hash)),
                ("plain".to_owned(), Secret::new("pw")),
            ]
            .into_iter()
            .collect(),
        );
        Users::validate(&users.users).unwrap();
        let ok = header(&basic_header("ops", "s3cret"));
        assert_eq!(users.check(Some(&ok)).await.unwrap(), "ops");
        let ok = header(&basic_header("plain", "pw"));
        assert_eq!(users.check(Some(&ok)).await.unwrap(), "plain");
        let wrong = header(&basic_header("ops", "guess"));
        assert_eq!(users.check(Some(&wrong)).await, Err(Denied::BadPassword));
        let nobody = header(&basic_header("nobody", "pw"));
        assert_eq!(users.check(Some(&nobody)).await, Err(Denied::UnknownUser));
        assert_eq!(users.check(None).await, Err(Denied::NoCredentials));
        assert_eq!(
            users.check(Some(&header("Basic !!!"))).await,
            Err(Denied::Malformed)
        );
        assert_eq!(
            users.check(Some(&header("Bearer abc"))).await,
            Err(Denied::NoCredentials)
        );
    }

    #[test]
    fn a_truncated_hash_is_a_config_error_naming_the_user() {
        let hash = tsgw_mqtt::auth::hash_password("x").unwrap();
        let users: BTreeMap<String, Secret> = [(
            "ops".to_owned(),
            Secret::new(&hash[..hash.rfind('$').unwrap()]),
        )]
        .into_iter()
        .collect();
        let err = Users::validate(&users).unwrap_err();
        assert!(
            err.contains("http.users.ops") && err.contains("tsgw passwd"),
            "{err}"
        );
    }

    #[test]
    fn passwords_never_show_in_debug() {
        let users = Users::new(
            [("ops".to_owned(), Secret::new("hunter2"))]
                .into_iter()
                .collect(),
        );
        assert!(!format!("{users:?}").contains("hunter2"));
    }
}
