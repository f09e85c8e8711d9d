//! The kernel's reasons for the resets it sends (`enum sk_rst_reason`, passed by
//! `tcp:tcp_send_reset` since Linux 6.10), named from the running kernel's BTF: the numbering
//! changes between kernels as reasons are added.

/// The prefix of every `enum sk_rst_reason` enumerator (`SK_RST_REASON_TCP_ABORT_ON_CLOSE`).
const PREFIX: &str = "SK_RST_REASON_";

/// Enumerators beyond this value are not kept (the enum has a few dozen).
const MAX_VALUE: u32 = 1024;

/// The names of the kernel's reset reasons, by value: lower case, without the prefix, as the
/// records give them (`tcp_abort_on_close`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResetReasons(Vec<Option<String>>);

impl ResetReasons {
    /// From the enumerators of `enum sk_rst_reason`.
    pub fn from_enumerators<'a>(enumerators: impl IntoIterator<Item = (&'a str, u32)>) -> Self {
        let mut names = Vec::new();
        for (name, value) in enumerators {
            if value > MAX_VALUE {
                continue;
            }
            let value = value as usize;
            if names.len() <= value {
                names.resize(value + 1, None);
            }
            let name = name.strip_prefix(PREFIX).unwrap_or(name);
            names[value] = Some(name.to_ascii_lowercase());
        }
        Self(names)
    }

    /// The name of reason `value`; `None` when this kernel has none by that value.
    pub fn name(&self, value: u16) -> Option<&str> {
        self.0.get(usize::from(value))?.as_deref()
    }
}

/// A reason as the text line says it: `tcp_abort_on_close` is "abort on close" (every reset
/// tcpclose sees is TCP's).
pub fn spoken(reason: &str) -> String {
    reason
        .strip_prefix("tcp_")
        .unwrap_or(reason)
        .replace('_', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_reasons_by_value_as_the_kernel_numbers_them() {
        let reasons = ResetReasons::from_enumerators([
            ("SK_RST_REASON_NOT_SPECIFIED", 0),
            ("SK_RST_REASON_TCP_ABORT_ON_CLOSE", 11),
            ("SK_RST_REASON_MAX", u32::MAX),
        ]);
        assert_eq!(reasons.name(0), Some("not_specified"));
        assert_eq!(reasons.name(11), Some("tcp_abort_on_close"));
        assert_eq!(reasons.name(5), None);
        assert_eq!(reasons.name(400), None);
        assert_eq!(spoken("tcp_abort_on_close"), "abort on close");
        assert_eq!(spoken("no_socket"), "no socket");
    }
}
