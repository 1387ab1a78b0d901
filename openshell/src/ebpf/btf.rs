//! Just enough of the BPF Type Format to find struct member offsets in `/sys/kernel/btf/vmlinux`.
//!
//! Rust eBPF has no CO-RE relocations, so the connect programs follow kernel pointers with
//! offsets that user space reads here and hands over in the config map. aya parses BTF but does
//! not expose struct members, so this reader walks the type section itself: the format is small
//! and stable (`Documentation/bpf/btf.rst`). Only what the offset lookup needs is decoded; other
//! kinds are skipped by their documented sizes.

use std::collections::HashMap;

/// Why the BTF could not be read or a member not found.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("BTF data is truncated or malformed: {0}")]
    Malformed(&'static str),
    #[error("BTF has unknown type kind {kind} (type id {id})")]
    UnknownKind { id: u32, kind: u32 },
    #[error("kernel BTF has no struct `{0}`")]
    NoStruct(String),
    #[error("kernel BTF struct `{strukt}` has no member `{member}`")]
    NoMember { strukt: String, member: String },
    #[error("kernel BTF member `{strukt}.{member}` is a bitfield; openshell needs a whole field")]
    Bitfield { strukt: String, member: String },
    #[error("kernel BTF member `{strukt}.{member}` is {actual} bytes, expected {expected}")]
    Size {
        strukt: String,
        member: String,
        actual: u32,
        expected: u32,
    },
}

const MAGIC: u16 = 0xeb9f;

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

#[derive(Debug, Clone, Copy)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Bit offset from the start of the enclosing struct or union.
    bit_offset: u32,
    bitfield_size: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name_off: u32,
    kind: u32,
    /// `size` for INT/STRUCT/UNION/ENUM/FLOAT, the referenced type id for PTR/TYPEDEF/....
    size_or_type: u32,
    /// Element type and count for ARRAY.
    array: Option<(u32, u32)>,
    members: Vec<Member>,
}

/// Parsed BTF: types (id 1 is index 0) and the string section.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    structs_by_name: HashMap<String, u32>,
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u32(&mut self) -> Result<u32, BtfError> {
        let bytes = self
            .data
            .get(self.pos..self.pos + 4)
            .ok_or(BtfError::Malformed("type section ends inside a type"))?;
        self.pos += 4;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn skip(&mut self, n: usize) -> Result<(), BtfError> {
        if self.pos + n > self.data.len() {
            return Err(BtfError::Malformed("type section ends inside a type"));
        }
        self.pos += n;
        Ok(())
    }
}

fn le_u32(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(BtfError::Malformed("header truncated"))
}

impl Btf {
    /// Parses little-endian BTF (the host's; openshell runs on little-endian machines only, as
    /// its eBPF object is built for `bpfel`).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let magic = data
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or(BtfError::Malformed("header truncated"))?;
        if magic != MAGIC {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = le_u32(data, 4)? as usize;
        let type_off = le_u32(data, 8)? as usize;
        let type_len = le_u32(data, 12)? as usize;
        let str_off = le_u32(data, 16)? as usize;
        let str_len = le_u32(data, 20)? as usize;
        let types_data = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();

        let mut r = Reader {
            data: types_data,
            pos: 0,
        };
        let mut types = Vec::new();
        while r.pos < types_data.len() {
            let id = u32::try_from(types.len() + 1)
                .map_err(|_| BtfError::Malformed("too many types"))?;
            let name_off = r.u32()?;
            let info = r.u32()?;
            let size_or_type = r.u32()?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut ty = Type {
                name_off,
                kind,
                size_or_type,
                array: None,
                members: Vec::new(),
            };
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => r.skip(4)?,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => {}
                KIND_ARRAY => {
                    let elem = r.u32()?;
                    let _index_type = r.u32()?;
                    let nelems = r.u32()?;
                    ty.array = Some((elem, nelems));
                }
                KIND_STRUCT | KIND_UNION => {
                    ty.members.reserve(vlen);
                    for _ in 0..vlen {
                        let name_off = r.u32()?;
                        let type_id = r.u32()?;
                        let offset = r.u32()?;
                        let (bit_offset, bitfield_size) = if kind_flag {
                            (offset & 0x00ff_ffff, offset >> 24)
                        } else {
                            (offset, 0)
                        };
                        ty.members.push(Member {
                            name_off,
                            type_id,
                            bit_offset,
                            bitfield_size,
                        });
                    }
                }
                KIND_ENUM | KIND_FUNC_PROTO => r.skip(8 * vlen)?,
                KIND_DATASEC | KIND_ENUM64 => r.skip(12 * vlen)?,
                other => return Err(BtfError::UnknownKind { id, kind: other }),
            }
            types.push(ty);
        }

        let mut btf = Self {
            types,
            strings,
            structs_by_name: HashMap::new(),
        };
        let mut by_name = HashMap::new();
        for (index, ty) in btf.types.iter().enumerate() {
            // A forward declaration has kind FWD, so every STRUCT here is a definition; keep the
            // first one with members (vmlinux has exactly one per name).
            if ty.kind == KIND_STRUCT && !ty.members.is_empty() {
                let name = btf.name(ty.name_off)?;
                if !name.is_empty() {
                    by_name.entry(name.to_owned()).or_insert(index as u32 + 1);
                }
            }
        }
        btf.structs_by_name = by_name;
        Ok(btf)
    }

    fn name(&self, off: u32) -> Result<&str, BtfError> {
        let tail = self
            .strings
            .get(off as usize..)
            .ok_or(BtfError::Malformed("string offset out of bounds"))?;
        let end = tail
            .iter()
            .position(|&b| b == 0)
            .ok_or(BtfError::Malformed("unterminated string"))?;
        std::str::from_utf8(&tail[..end]).map_err(|_| BtfError::Malformed("string is not UTF-8"))
    }

    fn ty(&self, id: u32) -> Result<&Type, BtfError> {
        id.checked_sub(1)
            .and_then(|i| self.types.get(i as usize))
            .ok_or(BtfError::Malformed("type id out of range"))
    }

    /// Follows typedef/const/volatile/restrict/type_tag to the underlying type.
    fn resolve(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..32 {
            let ty = self.ty(id)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_type;
                }
                _ => return Ok(id),
            }
        }
        Err(BtfError::Malformed("type chain too deep"))
    }

    /// Size in bytes of a type (pointers are 8 bytes: openshell supports 64-bit hosts only).
    fn size_of(&self, id: u32) -> Result<u32, BtfError> {
        let ty = self.ty(self.resolve(id)?)?;
        match ty.kind {
            KIND_PTR => Ok(8),
            KIND_ARRAY => {
                let (elem, n) = ty.array.ok_or(BtfError::Malformed("array without data"))?;
                Ok(self.size_of(elem)?.saturating_mul(n))
            }
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT => {
                Ok(ty.size_or_type)
            }
            _ => Err(BtfError::Malformed("member type has no size")),
        }
    }

    /// Searches `members` of struct/union `id` for `member`, descending into anonymous structs
    /// and unions. Returns (bit offset from the start of `id`, member).
    fn find(&self, id: u32, member: &str, depth: u32) -> Result<Option<(u32, Member)>, BtfError> {
        if depth > 8 {
            return Ok(None);
        }
        let ty = self.ty(id)?;
        for m in &ty.members {
            if m.name_off != 0 {
                if self.name(m.name_off)? == member {
                    return Ok(Some((m.bit_offset, *m)));
                }
                continue;
            }
            let inner = self.resolve(m.type_id)?;
            let inner_kind = self.ty(inner)?.kind;
            if (inner_kind == KIND_STRUCT || inner_kind == KIND_UNION)
                && let Some((off, found)) = self.find(inner, member, depth + 1)?
            {
                return Ok(Some((m.bit_offset + off, found)));
            }
        }
        Ok(None)
    }

    /// Byte offset of `strukt.member` (anonymous structs and unions are searched), checking that
    /// the member is `expected_size` bytes and not a bitfield.
    pub fn member_offset(
        &self,
        strukt: &str,
        member: &str,
        expected_size: u32,
    ) -> Result<u32, BtfError> {
        let id = *self
            .structs_by_name
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        let (bit_offset, m) = self
            .find(id, member, 0)?
            .ok_or_else(|| BtfError::NoMember {
                strukt: strukt.to_owned(),
                member: member.to_owned(),
            })?;
        if m.bitfield_size != 0 || bit_offset % 8 != 0 {
            return Err(BtfError::Bitfield {
                strukt: strukt.to_owned(),
                member: member.to_owned(),
            });
        }
        let actual = self.size_of(m.type_id)?;
        if actual != expected_size {
            return Err(BtfError::Size {
                strukt: strukt.to_owned(),
                member: member.to_owned(),
                actual,
                expected: expected_size,
            });
        }
        Ok(bit_offset / 8)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;

    /// Builds a BTF blob from (name, info, size_or_type, extra words) entries.
    struct Builder {
        types: Vec<u32>,
        strings: Vec<u8>,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
            }
        }

        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }

        fn add(
            &mut self,
            name: &str,
            kind: u32,
            vlen: u32,
            kind_flag: bool,
            sot: u32,
            extra: &[u32],
        ) {
            let n = self.s(name);
            let info = (u32::from(kind_flag) << 31) | (kind << 24) | vlen;
            self.types.extend_from_slice(&[n, info, sot]);
            self.types.extend_from_slice(extra);
        }

        fn member(&mut self, name: &str, type_id: u32, bit_offset: u32) -> [u32; 3] {
            [self.s(name), type_id, bit_offset]
        }

        fn build(&self) -> Vec<u8> {
            let type_len = (self.types.len() * 4) as u32;
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.push(1);
            out.push(0);
            for w in [24u32, 0, type_len, type_len, self.strings.len() as u32] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            for w in &self.types {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// 1 int(4), 2 long(8), 3 ptr->1, 4 typedef pid_t=1, 5 anon struct {exe_file: ptr @64},
    /// 6 struct mm {a: int @0, <anon 5> @128}, 7 enum (2 values), 8 struct bits {x:3 bitfield}.
    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        b.add("int", KIND_INT, 0, false, 4, &[32]);
        b.add("long", KIND_INT, 0, false, 8, &[64]);
        b.add("", KIND_PTR, 0, false, 1, &[]);
        b.add("pid_t", KIND_TYPEDEF, 0, false, 1, &[]);
        let m = b.member("exe_file", 3, 64);
        b.add("", KIND_STRUCT, 1, false, 16, &m);
        let m1 = b.member("a", 4, 0);
        let m2 = b.member("", 5, 128);
        let mut ms = m1.to_vec();
        ms.extend_from_slice(&m2);
        b.add("mm", KIND_STRUCT, 2, false, 32, &ms);
        let e1 = b.s("A");
        let e2 = b.s("B");
        b.add("e", KIND_ENUM, 2, false, 4, &[e1, 0, e2, 1]);
        let m = b.member("x", 1, (3 << 24) | 5);
        b.add("bits", KIND_STRUCT, 1, true, 4, &m);
        b.build()
    }

    #[test]
    fn finds_members_through_anonymous_structs_and_typedefs() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("mm", "a", 4).unwrap(), 0);
        assert_eq!(btf.member_offset("mm", "exe_file", 8).unwrap(), 24);
    }

    #[test]
    fn reports_missing_struct_member_and_size() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(
            btf.member_offset("nope", "a", 4),
            Err(BtfError::NoStruct("nope".into()))
        );
        assert!(matches!(
            btf.member_offset("mm", "nope", 4),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("mm", "a", 8),
            Err(BtfError::Size {
                actual: 4,
                expected: 8,
                ..
            })
        ));
        assert!(matches!(
            btf.member_offset("bits", "x", 4),
            Err(BtfError::Bitfield { .. })
        ));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(&[]).is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0]).is_err());
        let mut blob = sample();
        blob[0] = 0;
        assert!(Btf::parse(&blob).is_err());
        let blob = sample();
        assert!(Btf::parse(&blob[..blob.len() - 20]).is_err());
    }

    #[test]
    fn host_vmlinux_has_the_fields_openshell_follows() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("skipped: /sys/kernel/btf/vmlinux is not readable on this host");
            return;
        };
        let btf = Btf::parse(&data).unwrap();
        for (s, m, size) in [
            ("task_struct", "mm", 8),
            ("task_struct", "real_parent", 8),
            ("task_struct", "tgid", 4),
            ("mm_struct", "exe_file", 8),
            ("file", "f_inode", 8),
            ("inode", "i_sb", 8),
            ("inode", "i_ino", 8),
            ("super_block", "s_dev", 4),
            ("inode", "__i_nlink", 4),
        ] {
            btf.member_offset(s, m, size)
                .unwrap_or_else(|e| panic!("{s}.{m}: {e}"));
        }
        super::super::ctime_offsets(&btf).unwrap();
        // pid and tgid are adjacent ints in task_struct.
        assert_eq!(
            btf.member_offset("task_struct", "tgid", 4).unwrap(),
            btf.member_offset("task_struct", "pid", 4).unwrap() + 4
        );
    }
}
