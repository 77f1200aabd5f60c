//! The handshake between the supervisor and a freshly started plugin:
//! environment variables in, one line on stdout out.
//!
//! ```text
//! plugvisor|1|unix|/run/plugvisor/plugins/echo-0-1/plugin.sock
//! ```

use std::fmt;

/// Environment variable naming the absolute socket path the plugin must listen on.
pub const ENV_SOCKET: &str = "PLUGVISOR_PLUGIN_SOCKET";
/// Environment variable naming the plugin, as the supervisor knows it.
pub const ENV_NAME: &str = "PLUGVISOR_PLUGIN_NAME";
/// Environment variable naming this started instance (`<plugin>-<replica>-<n>`),
/// the same id Initialize carries.
pub const ENV_INSTANCE_ID: &str = "PLUGVISOR_INSTANCE_ID";
/// Environment variable listing the protocol versions the supervisor speaks,
/// comma separated (e.g. `1`).
pub const ENV_PROTOCOL_VERSIONS: &str = "PLUGVISOR_PROTOCOL_VERSIONS";
/// Environment variable carrying [`MAGIC_COOKIE_VALUE`].
pub const ENV_MAGIC_COOKIE: &str = "PLUGVISOR_MAGIC_COOKIE";
/// A fixed value. It is not a secret: it only tells a plugin it was started by
/// a supervisor rather than by hand.
pub const MAGIC_COOKIE_VALUE: &str = "d3c7f1b2-plugvisor-5a9e-4c1d-8f60-plugin-v1";
/// The protocol version this crate describes.
pub const PROTOCOL_VERSION: u32 = 1;
/// First field of the handshake line.
pub const PREFIX: &str = "plugvisor";
/// The only transport defined today.
pub const NETWORK_UNIX: &str = "unix";

/// The handshake line's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    pub protocol_version: u32,
    pub network: String,
    pub address: String,
}

impl fmt::Display for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}|{}|{}|{}",
            self.protocol_version, self.network, self.address
        )
    }
}

/// Why a line is not a valid handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The line does not start with `plugvisor|`: it is ordinary log output.
    NotAHandshake,
    /// The line starts with `plugvisor|` but is malformed.
    Malformed(String),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::NotAHandshake => write!(f, "not a handshake line"),
            HandshakeError::Malformed(why) => write!(f, "malformed handshake line: {why}"),
        }
    }
}

impl std::error::Error for HandshakeError {}

impl Handshake {
    /// Parses one stdout line. Lines that do not start with `plugvisor|` are
    /// [`HandshakeError::NotAHandshake`] so the caller can treat them as logs.
    pub fn parse(line: &str) -> Result<Handshake, HandshakeError> {
        let line = line.trim_end_matches(['\r', '\n']);
        let Some(rest) = line.strip_prefix("plugvisor|") else {
            return Err(HandshakeError::NotAHandshake);
        };
        let mut parts = rest.splitn(3, '|');
        let (Some(version), Some(network), Some(address)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(HandshakeError::Malformed(format!(
                "expected `plugvisor|<version>|unix|<socket path>`, got `{line}`"
            )));
        };
        let protocol_version = version.parse().map_err(|_| {
            HandshakeError::Malformed(format!(
                "protocol version `{version}` is not a number in `{line}`"
            ))
        })?;
        if address.is_empty() {
            return Err(HandshakeError::Malformed(format!(
                "empty socket path in `{line}`"
            )));
        }
        Ok(Handshake {
            protocol_version,
            network: network.to_string(),
            address: address.to_string(),
        })
    }
}

/// Parses `PLUGVISOR_PROTOCOL_VERSIONS` (`"1"`, `"1,2"`); ignores blanks and junk.
pub fn parse_versions(value: &str) -> Vec<u32> {
    value
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_handshake_line() {
        let h = Handshake {
            protocol_version: 1,
            network: "unix".into(),
            address: "/tmp/x/plugin.sock".into(),
        };
        assert_eq!(h.to_string(), "plugvisor|1|unix|/tmp/x/plugin.sock");
        assert_eq!(Handshake::parse(&format!("{h}\n")).unwrap(), h);
    }

    #[test]
    fn ordinary_output_is_not_a_handshake() {
        assert_eq!(
            Handshake::parse("starting up..."),
            Err(HandshakeError::NotAHandshake)
        );
    }

    #[test]
    fn malformed_handshake_quotes_the_line() {
        let err = Handshake::parse("plugvisor|x|unix|/s").unwrap_err();
        assert!(err.to_string().contains("plugvisor|x|unix|/s"), "{err}");
        let err = Handshake::parse("plugvisor|1|unix").unwrap_err();
        assert!(matches!(err, HandshakeError::Malformed(_)), "{err}");
    }

    #[test]
    fn parses_version_lists() {
        assert_eq!(parse_versions("1, 2,x,"), vec![1, 2]);
    }
}
