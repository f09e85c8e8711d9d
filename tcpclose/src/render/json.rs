//! Pieces of the JSON lines both printers write by hand: at full churn the output is among the
//! tracer's hottest work, and serde's generic path costs twice as much for these flat records.
//! Only `comm` (any bytes a task names itself) needs escaping; see [`json_escaped`].

use std::{
    io::{self, Write as _},
    net::SocketAddr,
};

use jiff::Timestamp;

use crate::{
    cgroups::Cgroups,
    event::{Family, Placement},
};

/// A string of any content as a JSON string, escaped as JSON requires (through serde_json).
pub(super) fn json_escaped(line: &mut Vec<u8>, value: &str) -> io::Result<()> {
    serde_json::to_writer(&mut *line, value).map_err(io::Error::other)
}

/// `,"family":...,"laddr":...,"lport":...,"raddr":...,"rport":...`: a socket's ends, as every
/// record names them.
pub(super) fn json_ends(
    line: &mut Vec<u8>,
    family: Family,
    local: SocketAddr,
    remote: SocketAddr,
) -> io::Result<()> {
    line.extend_from_slice(b",\"family\":");
    json_str(line, Some(family.name()));
    line.extend_from_slice(b",\"laddr\":");
    json_ip(line, local.ip())?;
    line.extend_from_slice(b",\"lport\":");
    json_u64(line, Some(local.port().into()));
    line.extend_from_slice(b",\"raddr\":");
    json_ip(line, remote.ip())?;
    line.extend_from_slice(b",\"rport\":");
    json_u64(line, Some(remote.port().into()));
    Ok(())
}

/// `,"netns":...,"cgroup":...,"container_id":...,"pod_uid":...`: where a socket lives, as
/// every record names it (`null` for what is unknown).
pub(super) fn json_placement(
    line: &mut Vec<u8>,
    placement: Placement,
    cgroups: &Cgroups,
) -> io::Result<()> {
    line.extend_from_slice(b",\"netns\":");
    json_u64(line, placement.netns().map(u64::from));
    let info = placement.cgroup().and_then(|id| cgroups.info(id));
    line.extend_from_slice(b",\"cgroup\":");
    match &info {
        // Directory names are any bytes but `/` and NUL.
        Some(info) => json_escaped(line, &info.path)?,
        None => line.extend_from_slice(b"null"),
    }
    line.extend_from_slice(b",\"container_id\":");
    json_str(line, info.as_ref().and_then(|i| i.container_id.as_deref()));
    line.extend_from_slice(b",\"pod_uid\":");
    json_str(line, info.as_ref().and_then(|i| i.pod_uid.as_deref()));
    Ok(())
}

/// A kernel address as `"0x..."`: lowercase hex without leading zeros, as `{:#x}` writes it.
pub(super) fn json_hex(line: &mut Vec<u8>, value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut n = value;
    let mut len = 0;
    loop {
        digits[15 - len] = DIGITS[(n & 0xf) as usize];
        len += 1;
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    line.extend_from_slice(b"\"0x");
    line.extend_from_slice(&digits[16 - len..]);
    line.push(b'"');
}

pub(super) fn json_u64(line: &mut Vec<u8>, value: Option<u64>) {
    match value {
        Some(v) => line.extend_from_slice(itoa::Buffer::new().format(v).as_bytes()),
        None => line.extend_from_slice(b"null"),
    }
}

/// An address as a JSON string: IPv4 digit by digit (the common case, and `Display` goes through
/// the formatting machinery), IPv6 through `Display`.
pub(super) fn json_ip(line: &mut Vec<u8>, ip: std::net::IpAddr) -> io::Result<()> {
    line.push(b'"');
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    line.push(b'.');
                }
                line.extend_from_slice(itoa::Buffer::new().format(octet).as_bytes());
            }
        }
        std::net::IpAddr::V6(v6) => write!(line, "{v6}")?,
    }
    line.push(b'"');
    Ok(())
}

/// A string known to need no escaping (a name of ours), or `null`.
pub(super) fn json_str(line: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(v) => {
            line.push(b'"');
            line.extend_from_slice(v.as_bytes());
            line.push(b'"');
        }
        None => line.extend_from_slice(b"null"),
    }
}

/// RFC 3339 UTC time, exactly as jiff's `Timestamp` displays it (nanoseconds without their
/// trailing zeros), with the text up to the seconds kept from one record to the next: the
/// records of a busy second share it.
#[derive(Default)]
pub(super) struct TimeText {
    second: Option<i64>,
    /// `2026-11-22T07:52:48`.
    prefix: String,
}

impl TimeText {
    pub(super) fn write(&mut self, line: &mut Vec<u8>, at: Timestamp) -> io::Result<()> {
        let second = at.as_second();
        if self.second != Some(second) {
            let whole = Timestamp::from_second(second).unwrap_or(Timestamp::UNIX_EPOCH);
            self.prefix = whole.to_string();
            // `...:48Z`: the zone goes after the fraction.
            self.prefix.pop();
            self.second = Some(second);
        }
        line.extend_from_slice(self.prefix.as_bytes());
        let nanos = at.subsec_nanosecond();
        if nanos != 0 {
            let mut digits = *b"000000000";
            let mut n = nanos.unsigned_abs();
            for d in digits.iter_mut().rev() {
                *d = b'0' + (n % 10) as u8;
                n /= 10;
            }
            let len = 9 - digits.iter().rev().take_while(|&&d| d == b'0').count();
            line.push(b'.');
            line.extend_from_slice(&digits[..len]);
        }
        line.push(b'Z');
        Ok(())
    }
}
