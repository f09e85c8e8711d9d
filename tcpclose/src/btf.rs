//! Just enough of the BPF Type Format to find where a struct member is, from the running kernel's
//! own description of itself (`/sys/kernel/btf/vmlinux`). Layout of the format:
//! `Documentation/bpf/btf.rst` and `include/uapi/linux/btf.h`.
//!
//! tcpclose reads a dozen member offsets once at start-up; a general BTF library would bring
//! much more than that (and the maintained one is LGPL, which this MIT/Apache crate avoids).

use std::{collections::HashMap, fmt};

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
const TYPE_LEN: usize = 12;

// BTF_KIND_* values.
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BtfError {
    /// Not BTF, or cut short.
    Malformed(&'static str),
    /// A kind this reader does not know how to skip: a newer format.
    UnknownKind(u32),
    NoStruct(String),
    NoMember {
        ty: String,
        member: String,
    },
    /// The member is a bit field, or not where a byte offset can say.
    NotByteAligned {
        ty: String,
        member: String,
    },
}

impl fmt::Display for BtfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(what) => write!(f, "malformed BTF: {what}"),
            Self::UnknownKind(kind) => write!(f, "BTF type kind {kind} is not supported"),
            Self::NoStruct(name) => write!(f, "no `struct {name}` in the kernel's BTF"),
            Self::NoMember { ty, member } => write!(f, "`struct {ty}` has no member `{member}`"),
            Self::NotByteAligned { ty, member } => {
                write!(f, "`struct {ty}` member `{member}` is a bit field")
            }
        }
    }
}

impl std::error::Error for BtfError {}

/// Names of the typedefs that describe raw tracepoints: `btf_trace_<event>`.
const TRACEPOINT_TYPEDEF: &str = "btf_trace_";

/// One parameter of a function prototype in a [`Btf`].
#[derive(Clone, Copy)]
pub struct Param<'a> {
    btf: &'a Btf,
    type_id: u32,
}

impl Param<'_> {
    /// The name of the struct this parameter points to, through typedefs and qualifiers
    /// (`const struct sock *` gives `sock`); `None` for anything but a pointer to a struct.
    pub fn pointee_struct(&self) -> Option<&str> {
        let Some(Type::Pointer(target)) = self.btf.resolve(self.type_id) else {
            return None;
        };
        match self.btf.resolve(*target)? {
            Type::Composite {
                name_off,
                struct_: true,
                ..
            } => Some(self.btf.name(*name_off)),
            Type::Named {
                name_off,
                kind: KIND_FWD,
                union_: false,
            } => Some(self.btf.name(*name_off)),
            _ => None,
        }
    }

    /// The name of the enum this parameter is (through typedefs and qualifiers), if it is one.
    pub fn enum_name(&self) -> Option<&str> {
        match self.btf.resolve(self.type_id)? {
            Type::Enum { name_off, .. } => Some(self.btf.name(*name_off)),
            _ => None,
        }
    }

    /// The size in bytes of this parameter when it is an integer (through typedefs), else `None`.
    pub fn int_size(&self) -> Option<u32> {
        match self.btf.resolve(self.type_id)? {
            Type::Int { size, .. } => Some(*size),
            _ => None,
        }
    }
}

impl fmt::Display for Param<'_> {
    /// The type as C spells it, near enough for a message: `const struct sock *`, `int`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.btf.spell(self.type_id, 0))
    }
}

#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield: bool,
}

#[derive(Clone, Debug)]
enum Type {
    /// Struct or union, with the size in bytes.
    Composite {
        name_off: u32,
        struct_: bool,
        size: u32,
        members: Vec<Member>,
    },
    /// A typedef: another name for `target`.
    Typedef {
        name_off: u32,
        target: u32,
    },
    /// const, volatile, restrict, type tag: `target`, qualified.
    Qualifier {
        kind: u32,
        target: u32,
    },
    Pointer(u32),
    /// An integer (or char, or bool) of `size` bytes.
    Int {
        name_off: u32,
        size: u32,
    },
    /// A function prototype: its parameters' type ids, in order.
    FuncProto {
        params: Vec<u32>,
    },
    /// An enum: its enumerators are `Btf::enumerators[first..first + count]`.
    Enum {
        name_off: u32,
        first: u32,
        count: u32,
    },
    /// A forward declaration (`union` when `union_`), enum64 or float: known by name only.
    Named {
        name_off: u32,
        kind: u32,
        union_: bool,
    },
    Other,
}

/// The types of one BTF blob, by id (id 0 is `void`).
pub struct Btf {
    types: Vec<Type>,
    /// Every (32-bit) enum's enumerators, in order: name offset and value.
    enumerators: Vec<(u32, u32)>,
    strings: Vec<u8>,
    structs: HashMap<String, u32>,
    /// The `btf_trace_<event>` typedefs, one per raw tracepoint, by event.
    tracepoints: HashMap<String, u32>,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, BtfError> {
    b.get(at..at + 2)
        .map(|s| u16::from_ne_bytes([s[0], s[1]]))
        .ok_or(BtfError::Malformed("truncated"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    /// Parses a BTF blob in this machine's byte order (as the kernel exposes its own).
    pub fn parse(bytes: &[u8]) -> Result<Self, BtfError> {
        if u16_at(bytes, 0)? != MAGIC {
            return Err(BtfError::Malformed("bad magic"));
        }
        let hdr_len = u32_at(bytes, 4)? as usize;
        if hdr_len < HEADER_LEN {
            return Err(BtfError::Malformed("header too short"));
        }
        let section = |off: usize, len: usize| -> Result<&[u8], BtfError> {
            let start = hdr_len + u32_at(bytes, off)? as usize;
            let len = u32_at(bytes, len)? as usize;
            bytes
                .get(start..start.saturating_add(len))
                .ok_or(BtfError::Malformed("section out of bounds"))
        };
        let type_section = section(8, 12)?;
        let strings = section(16, 20)?.to_vec();

        let mut types = vec![Type::Other];
        let mut enumerators = Vec::new();
        let mut at = 0;
        while at < type_section.len() {
            let name_off = u32_at(type_section, at)?;
            let info = u32_at(type_section, at + 4)?;
            let size_or_type = u32_at(type_section, at + 8)?;
            at += TYPE_LEN;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 != 0;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(type_section, m + 8)?;
                        // With kind_flag, the top 8 bits are the bit-field size.
                        let (bit_offset, bitfield) = if kind_flag {
                            (offset & 0xff_ffff, offset >> 24 != 0)
                        } else {
                            (offset, false)
                        };
                        members.push(Member {
                            name_off: u32_at(type_section, m)?,
                            type_id: u32_at(type_section, m + 4)?,
                            bit_offset,
                            bitfield,
                        });
                    }
                    at += vlen * 12;
                    Type::Composite {
                        name_off,
                        struct_: kind == KIND_STRUCT,
                        size: size_or_type,
                        members,
                    }
                }
                KIND_TYPEDEF => Type::Typedef {
                    name_off,
                    target: size_or_type,
                },
                KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => Type::Qualifier {
                    kind,
                    target: size_or_type,
                },
                KIND_PTR => Type::Pointer(size_or_type),
                KIND_INT => {
                    at += 4;
                    Type::Int {
                        name_off,
                        size: size_or_type,
                    }
                }
                KIND_FUNC_PROTO => {
                    let mut params = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        params.push(u32_at(type_section, at + i * 8 + 4)?);
                    }
                    at += vlen * 8;
                    Type::FuncProto { params }
                }
                KIND_ENUM => {
                    let first = enumerators.len() as u32;
                    for i in 0..vlen {
                        let e = at + i * 8;
                        enumerators.push((u32_at(type_section, e)?, u32_at(type_section, e + 4)?));
                    }
                    at += vlen * 8;
                    Type::Enum {
                        name_off,
                        first,
                        count: vlen as u32,
                    }
                }
                KIND_FWD | KIND_ENUM64 | KIND_FLOAT => {
                    at += match kind {
                        KIND_ENUM64 => vlen * 12,
                        _ => 0,
                    };
                    Type::Named {
                        name_off,
                        kind,
                        union_: kind == KIND_FWD && kind_flag,
                    }
                }
                _ => {
                    at += match kind {
                        KIND_VAR | KIND_DECL_TAG => 4,
                        KIND_ARRAY => 12,
                        KIND_DATASEC => vlen * 12,
                        KIND_FUNC => 0,
                        other => return Err(BtfError::UnknownKind(other)),
                    };
                    Type::Other
                }
            };
            types.push(ty);
        }
        if at != type_section.len() {
            return Err(BtfError::Malformed("type section overruns"));
        }

        let mut btf = Self {
            types,
            enumerators,
            strings,
            structs: HashMap::new(),
            tracepoints: HashMap::new(),
        };
        for (id, ty) in btf.types.iter().enumerate() {
            if let Type::Composite {
                name_off,
                struct_: true,
                size,
                ..
            } = ty
                && *name_off != 0
                && *size != 0
            {
                let name = btf.name(*name_off).to_owned();
                btf.structs.entry(name).or_insert(id as u32);
            }
            if let Type::Typedef { name_off, .. } = ty
                && let Some(event) = btf.name(*name_off).strip_prefix(TRACEPOINT_TYPEDEF)
            {
                btf.tracepoints.insert(event.to_owned(), id as u32);
            }
        }
        Ok(btf)
    }

    /// `id` as C spells it (pointers as a trailing `*`), for messages.
    fn spell(&self, id: u32, depth: u32) -> String {
        if id == 0 {
            return "void".to_owned();
        }
        if depth > 16 {
            return "...".to_owned();
        }
        let name = |off: u32| match self.name(off) {
            "" => "(anonymous)",
            name => name,
        };
        match self.types.get(id as usize) {
            None | Some(Type::Other) => "?".to_owned(),
            Some(Type::Composite {
                name_off, struct_, ..
            }) => format!(
                "{} {}",
                if *struct_ { "struct" } else { "union" },
                name(*name_off)
            ),
            Some(Type::Typedef { name_off, .. }) | Some(Type::Int { name_off, .. }) => {
                name(*name_off).to_owned()
            }
            Some(Type::Qualifier { kind, target }) => {
                let qualifier = match *kind {
                    KIND_CONST => "const ",
                    KIND_VOLATILE => "volatile ",
                    _ => "",
                };
                format!("{qualifier}{}", self.spell(*target, depth + 1))
            }
            Some(Type::Pointer(target)) => format!("{} *", self.spell(*target, depth + 1)),
            Some(Type::FuncProto { .. }) => "function".to_owned(),
            Some(Type::Enum { name_off, .. }) => format!("enum {}", name(*name_off)),
            Some(Type::Named {
                name_off,
                kind,
                union_,
            }) => {
                let keyword = match (*kind, *union_) {
                    (KIND_FWD, false) => "struct ",
                    (KIND_FWD, true) => "union ",
                    (KIND_ENUM | KIND_ENUM64, _) => "enum ",
                    _ => "",
                };
                format!("{keyword}{}", name(*name_off))
            }
        }
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    /// The type `id` stands for, through typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            match self.types.get(id as usize)? {
                Type::Typedef { target, .. } | Type::Qualifier { target, .. } => id = *target,
                ty => return Some(ty),
            }
        }
        None
    }

    /// The arguments of the raw tracepoint `event` (after the `void *` context every raw
    /// tracepoint program gets first), from its `btf_trace_<event>` typedef: a pointer to the
    /// function prototype of the tracepoint's probes (`include/trace/bpf_probe.h`). `None` when
    /// the kernel has no such tracepoint.
    pub fn tracepoint_args(&self, event: &str) -> Option<Vec<Param<'_>>> {
        let id = *self.tracepoints.get(event)?;
        let Some(Type::Pointer(proto)) = self.resolve(id) else {
            return None;
        };
        let Some(Type::FuncProto { params }) = self.resolve(*proto) else {
            return None;
        };
        Some(
            params
                .iter()
                .skip(1)
                .map(|&type_id| Param { btf: self, type_id })
                .collect(),
        )
    }

    /// The enumerators of `enum name` (a 32-bit one), name and value, in order; `None` when the
    /// kernel has no such enum.
    pub fn enum_values(&self, name: &str) -> Option<Vec<(&str, u32)>> {
        self.types.iter().find_map(|ty| match ty {
            Type::Enum {
                name_off,
                first,
                count,
            } if self.name(*name_off) == name => Some(
                self.enumerators
                    .get(*first as usize..(*first + *count) as usize)?
                    .iter()
                    .map(|&(off, value)| (self.name(off), value))
                    .collect(),
            ),
            _ => None,
        })
    }

    /// Byte offset of `member` in `struct ty`, looking inside anonymous structs and unions (as
    /// C does: `sock_common.skc_daddr` lives in an anonymous union).
    pub fn member_offset(&self, ty: &str, member: &str) -> Result<usize, BtfError> {
        self.member(ty, member).map(|(offset, _)| offset)
    }

    /// Name of the struct or union `member` of `struct ty` is, if it is one.
    pub fn member_struct_name(&self, ty: &str, member: &str) -> Result<Option<&str>, BtfError> {
        let (_, type_id) = self.member(ty, member)?;
        Ok(match self.resolve(type_id) {
            Some(Type::Composite { name_off, .. }) => Some(self.name(*name_off)),
            _ => None,
        })
    }

    fn member(&self, ty: &str, member: &str) -> Result<(usize, u32), BtfError> {
        let id = *self
            .structs
            .get(ty)
            .ok_or_else(|| BtfError::NoStruct(ty.to_owned()))?;
        let found = self
            .find(id, member, 0, 0)
            .ok_or_else(|| BtfError::NoMember {
                ty: ty.to_owned(),
                member: member.to_owned(),
            })?;
        let (bit_offset, bitfield, type_id) = found;
        if bitfield || bit_offset % 8 != 0 {
            return Err(BtfError::NotByteAligned {
                ty: ty.to_owned(),
                member: member.to_owned(),
            });
        }
        Ok((bit_offset as usize / 8, type_id))
    }

    fn find(&self, id: u32, member: &str, base: u32, depth: u32) -> Option<(u32, bool, u32)> {
        let Some(Type::Composite { members, .. }) = self.resolve(id) else {
            return None;
        };
        if depth > 8 {
            return None;
        }
        for m in members {
            let offset = base + m.bit_offset;
            if m.name_off != 0 && self.name(m.name_off) == member {
                return Some((offset, m.bitfield, m.type_id));
            }
            if m.name_off == 0
                && let Some(found) = self.find(m.type_id, member, offset, depth + 1)
            {
                return Some(found);
            }
        }
        None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a BTF blob: `types` are `(name, kind, kind_flag, size_or_type, trailing words)`.
    pub(crate) fn blob(types: &[(&str, u32, bool, u32, Vec<u32>)], extra: &[&str]) -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut intern = |s: &str| -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = strings.len() as u32;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            off
        };
        let mut names: HashMap<String, u32> = HashMap::new();
        for s in types.iter().map(|t| t.0).chain(extra.iter().copied()) {
            let off = intern(s);
            names.entry(s.to_owned()).or_insert(off);
        }
        let mut section = Vec::new();
        for (name, kind, flag, size, words) in types {
            let vlen = match *kind {
                KIND_STRUCT | KIND_UNION => words.len() / 3,
                KIND_FUNC_PROTO | KIND_ENUM => words.len() / 2,
                _ => 0,
            } as u32;
            let info = vlen | (kind << 24) | (u32::from(*flag) << 31);
            for w in [names[*name], info, *size].iter().chain(words) {
                section.extend_from_slice(&w.to_ne_bytes());
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_ne_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [
            HEADER_LEN as u32,
            0,
            section.len() as u32,
            section.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_ne_bytes());
        }
        out.extend_from_slice(&section);
        out.extend_from_slice(&strings);
        out
    }

    /// Builds a BTF blob type by type, the way a kernel's would describe them; each method
    /// returns the new type's id.
    #[derive(Default)]
    pub(crate) struct Builder {
        types: Vec<(String, u32, bool, u32, Vec<u32>)>,
        /// Member and parameter names, interned after the types' names.
        names: Vec<String>,
    }

    impl Builder {
        fn add(&mut self, name: &str, kind: u32, flag: bool, size: u32, words: Vec<u32>) -> u32 {
            self.types.push((name.to_owned(), kind, flag, size, words));
            self.types.len() as u32
        }

        /// A placeholder for a name that [`Self::blob`] turns into its string offset.
        fn name_ref(&mut self, name: &str) -> u32 {
            self.names.push(name.to_owned());
            u32::MAX - (self.names.len() as u32 - 1)
        }

        pub(crate) fn int(&mut self, name: &str, size: u32) -> u32 {
            self.add(name, KIND_INT, false, size, vec![size * 8])
        }

        pub(crate) fn pointer(&mut self, target: u32) -> u32 {
            self.add("", KIND_PTR, false, target, vec![])
        }

        pub(crate) fn constant(&mut self, target: u32) -> u32 {
            self.add("", KIND_CONST, false, target, vec![])
        }

        pub(crate) fn typedef(&mut self, name: &str, target: u32) -> u32 {
            self.add(name, KIND_TYPEDEF, false, target, vec![])
        }

        /// `members`: `(name, type, bit offset, bit-field size or 0)`.
        pub(crate) fn structure(
            &mut self,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32, u32)],
        ) -> u32 {
            let bitfields = members.iter().any(|m| m.3 != 0);
            let mut words = Vec::new();
            for &(member, ty, offset, bits) in members {
                let offset = if bitfields {
                    (bits << 24) | offset
                } else {
                    offset
                };
                words.extend([self.name_ref(member), ty, offset]);
            }
            self.add(name, KIND_STRUCT, bitfields, size, words)
        }

        /// A 4-byte `enum name` with these enumerators.
        pub(crate) fn enumeration(&mut self, name: &str, values: &[(&str, u32)]) -> u32 {
            let mut words = Vec::new();
            for &(enumerator, value) in values {
                words.extend([self.name_ref(enumerator), value]);
            }
            self.add(name, KIND_ENUM, false, 4, words)
        }

        /// A function prototype returning `void` with these parameter types.
        pub(crate) fn func_proto(&mut self, params: &[u32]) -> u32 {
            let mut words = Vec::new();
            for &ty in params {
                words.extend([0, ty]);
            }
            self.add("", KIND_FUNC_PROTO, false, 0, words)
        }

        /// `btf_trace_<event>`: a typedef of a pointer to a prototype taking `void *` and `args`.
        pub(crate) fn tracepoint(&mut self, event: &str, args: &[u32]) -> u32 {
            let void_ptr = self.pointer(0);
            let params: Vec<u32> = std::iter::once(void_ptr)
                .chain(args.iter().copied())
                .collect();
            let proto = self.func_proto(&params);
            let pointer = self.pointer(proto);
            self.typedef(&format!("btf_trace_{event}"), pointer)
        }

        pub(crate) fn blob(&self) -> Vec<u8> {
            let type_names: Vec<&str> = self.types.iter().map(|t| t.0.as_str()).collect();
            let extra: Vec<&str> = self.names.iter().map(String::as_str).collect();
            let all: Vec<&str> = type_names.iter().chain(&extra).copied().collect();
            let types: Vec<_> = self
                .types
                .iter()
                .map(|(name, kind, flag, size, words)| {
                    let words = words
                        .iter()
                        .map(|&w| {
                            if w > u32::MAX - self.names.len() as u32 {
                                string_off(&all, &self.names[(u32::MAX - w) as usize])
                            } else {
                                w
                            }
                        })
                        .collect();
                    (name.as_str(), *kind, *flag, *size, words)
                })
                .collect();
            blob(&types, &extra)
        }
    }

    #[test]
    fn describes_raw_tracepoints_arguments() {
        let mut b = Builder::default();
        let int = b.int("int", 4);
        let ulong = b.int("long unsigned int", 8);
        let sock = b.structure("sock", 8, &[("sk_protocol", int, 0, 0)]);
        let const_sock = b.constant(sock);
        let sock_ptr = b.pointer(const_sock);
        let timer = b.structure("timer_list", 40, &[("expires", ulong, 128, 0)]);
        let timer_ptr = b.pointer(timer);
        b.tracepoint("inet_sock_set_state", &[sock_ptr, int, int]);
        b.tracepoint("timer_start", &[timer_ptr, ulong]);
        let btf = Btf::parse(&b.blob()).unwrap();

        let args = btf.tracepoint_args("inet_sock_set_state").unwrap();
        assert_eq!(args.len(), 3);
        assert_eq!(args[0].pointee_struct(), Some("sock"));
        assert_eq!(args[0].to_string(), "const struct sock *");
        assert_eq!(args[0].int_size(), None);
        assert_eq!(args[1].int_size(), Some(4));
        assert_eq!(args[1].to_string(), "int");
        let args = btf.tracepoint_args("timer_start").unwrap();
        assert_eq!(args[0].pointee_struct(), Some("timer_list"));
        assert_eq!(args[1].to_string(), "long unsigned int");
        assert!(btf.tracepoint_args("timer_cancel").is_none());
    }

    #[test]
    fn reads_enums_and_enum_parameters() {
        let mut b = Builder::default();
        let reason = b.enumeration("sk_rst_reason", &[("SK_A", 0), ("SK_B", 7)]);
        b.enumeration("other", &[("X", 1)]);
        let sock = b.structure("sock", 8, &[]);
        let sock_ptr = b.pointer(sock);
        b.tracepoint("tcp_send_reset", &[sock_ptr, sock_ptr, reason]);
        let btf = Btf::parse(&b.blob()).unwrap();
        assert_eq!(
            btf.enum_values("sk_rst_reason"),
            Some(vec![("SK_A", 0), ("SK_B", 7)])
        );
        assert_eq!(btf.enum_values("other"), Some(vec![("X", 1)]));
        assert_eq!(btf.enum_values("missing"), None);
        let args = btf.tracepoint_args("tcp_send_reset").unwrap();
        assert_eq!(args[2].enum_name(), Some("sk_rst_reason"));
        assert_eq!(args[2].to_string(), "enum sk_rst_reason");
        assert_eq!(args[0].enum_name(), None);
    }

    /// Offset of `name` in the string section built by [`blob`] (names of types come first).
    fn string_off(types: &[&str], name: &str) -> u32 {
        let mut off = 1;
        for s in types {
            if *s == name {
                return off;
            }
            if !s.is_empty() {
                off += s.len() as u32 + 1;
            }
        }
        panic!("{name} not interned")
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_typedefs() {
        // 1: int; 2: anonymous union { int a; int b; } ; 3: struct outer { int x; union; int c; }
        // 4: typedef outer_t -> 3; 5: struct holder { outer_t o @ 128; int bits : 3 @ 256 }
        let names = [
            "int", "", "outer", "outer_t", "holder", "a", "b", "x", "c", "o", "bits",
        ];
        let s = |n| string_off(&names, n);
        let types = vec![
            ("int", KIND_INT, false, 4, vec![32]),
            ("", KIND_UNION, false, 4, vec![s("a"), 1, 0, s("b"), 1, 0]),
            (
                "outer",
                KIND_STRUCT,
                false,
                12,
                vec![s("x"), 1, 0, 0, 2, 32, s("c"), 1, 64],
            ),
            ("outer_t", KIND_TYPEDEF, false, 3, vec![]),
            (
                "holder",
                KIND_STRUCT,
                true,
                40,
                vec![s("o"), 4, 128, s("bits"), 1, (3 << 24) | 256],
            ),
        ];
        let btf = Btf::parse(&blob(&types, &names[5..])).unwrap();
        assert_eq!(btf.member_offset("outer", "x"), Ok(0));
        assert_eq!(btf.member_offset("outer", "b"), Ok(4));
        assert_eq!(btf.member_offset("outer", "c"), Ok(8));
        assert_eq!(btf.member_offset("holder", "o"), Ok(16));
        assert_eq!(btf.member_struct_name("holder", "o"), Ok(Some("outer")));
        assert!(matches!(
            btf.member_offset("holder", "bits"),
            Err(BtfError::NotByteAligned { .. })
        ));
        assert!(matches!(
            btf.member_offset("holder", "nope"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("missing", "x"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(Btf::parse(&[]).is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0]).is_err());
        let names = ["int"];
        let mut b = blob(&[("int", KIND_INT, false, 4, vec![32])], &names);
        b.truncate(b.len() - 8);
        assert!(Btf::parse(&b).is_err());
        let unknown = blob(&[("int", 31, false, 4, vec![])], &names);
        assert_eq!(Btf::parse(&unknown).err(), Some(BtfError::UnknownKind(31)));
    }

    #[test]
    fn reads_this_kernels_btf() {
        // The real thing: every kernel tcpclose runs on has it.
        let bytes = std::fs::read("/sys/kernel/btf/vmlinux").expect("/sys/kernel/btf/vmlinux");
        let btf = Btf::parse(&bytes).unwrap();
        assert_eq!(btf.member_offset("sock_common", "skc_daddr"), Ok(0));
        assert_eq!(btf.member_offset("sock_common", "skc_rcv_saddr"), Ok(4));
        assert_eq!(
            btf.member_struct_name("inet_timewait_sock", "tw_timer"),
            Ok(Some("timer_list"))
        );
    }
}
