//! The WAL's bytes on disk. Everything here is frozen: a change means a new version,
//! and old versions stay readable.
//!
//! A WAL is a directory of segment files named `{file_id:020}.wal`. All integers are
//! little-endian.
//!
//! ## File header (32 bytes)
//!
//! | offset | size | type     | meaning                                              |
//! |-------:|-----:|----------|------------------------------------------------------|
//! | 0      | 8    | [u8; 8]  | magic `KILNWAL\0`                                    |
//! | 8      | 2    | u16      | format version (1)                                   |
//! | 10     | 2    | u16      | reserved, zero                                       |
//! | 12     | 8    | u64      | file id (equals the number in the file name)         |
//! | 20     | 8    | u64      | sequence number of the first record in this file     |
//! | 28     | 4    | u32      | CRC32 (IEEE) of bytes 0..28                          |
//!
//! ## Record (20-byte frame + payload), repeated to the end of the file
//!
//! | offset | size | type     | meaning                                              |
//! |-------:|-----:|----------|------------------------------------------------------|
//! | 0      | 4    | u32      | payload length `N`                                   |
//! | 4      | 4    | u32      | CRC32 of bytes 0..4 and 8..20+N (length, sequence, kind, reserved, payload) |
//! | 8      | 8    | u64      | sequence number; each record is the previous plus one |
//! | 16     | 1    | u8       | record kind ([`RecordKind`])                         |
//! | 17     | 3    | [u8; 3]  | reserved, zero                                       |
//! | 20     | N    | bytes    | payload, interpreted by kind                         |
//!
//! The checksum is verified before anything in the payload is decoded. A record whose
//! frame runs past the end of the file, or whose checksum fails, is torn or corrupt.

use crate::ids::{SequenceNumber, WalFileId};

pub const MAGIC: [u8; 8] = *b"KILNWAL\0";
pub const VERSION: u16 = 1;
pub const SUPPORTED_VERSIONS: &[u16] = &[1];
pub const FILE_HEADER_LEN: usize = 32;
pub const RECORD_HEADER_LEN: usize = 20;
/// Largest payload a record may carry; a length above it is corruption, not an allocation.
pub const MAX_PAYLOAD_LEN: usize = 1 << 30;

const _: () = assert!(FILE_HEADER_LEN == 8 + 2 + 2 + 8 + 8 + 4);
const _: () = assert!(RECORD_HEADER_LEN == 4 + 4 + 8 + 1 + 3);

/// What a record's payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// A [`crate::write::WriteBatch`] in its WAL encoding.
    WriteBatch = 1,
    /// A delete of rows ([`crate::catalog::tombstones::DeleteRecord`]).
    Delete = 2,
}

impl RecordKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::WriteBatch),
            2 => Some(Self::Delete),
            _ => None,
        }
    }
}

/// Why bytes are not a valid header or record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("file is {len} bytes, shorter than the {FILE_HEADER_LEN}-byte header")]
    ShortHeader { len: usize },
    #[error("bad magic {found:02x?}, expected {MAGIC:02x?}")]
    BadMagic { found: [u8; 8] },
    #[error("unsupported WAL format version {found}; supported versions: {SUPPORTED_VERSIONS:?}")]
    UnsupportedVersion { found: u16 },
    #[error("header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("record frame needs {needed} bytes but only {available} remain")]
    Truncated { needed: usize, available: usize },
    #[error("record claims a payload of {len} bytes, more than the {MAX_PAYLOAD_LEN} allowed")]
    Oversized { len: usize },
    #[error("record checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    RecordChecksum { stored: u32, computed: u32 },
    #[error("unknown record kind {kind}")]
    UnknownKind { kind: u8 },
}

/// The decoded file header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    pub file_id: WalFileId,
    pub first_sequence: SequenceNumber,
}

impl FileHeader {
    pub fn encode(&self) -> [u8; FILE_HEADER_LEN] {
        let mut buf = [0u8; FILE_HEADER_LEN];
        buf[0..8].copy_from_slice(&MAGIC);
        buf[8..10].copy_from_slice(&VERSION.to_le_bytes());
        buf[12..20].copy_from_slice(&self.file_id.get().to_le_bytes());
        buf[20..28].copy_from_slice(&self.first_sequence.get().to_le_bytes());
        let crc = crc32fast::hash(&buf[0..28]);
        buf[28..32].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let Some(h) = bytes.get(..FILE_HEADER_LEN) else {
            return Err(FormatError::ShortHeader { len: bytes.len() });
        };
        let magic: [u8; 8] = array(h, 0);
        if magic != MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        let stored = u32::from_le_bytes(array(h, 28));
        let computed = crc32fast::hash(&h[0..28]);
        if stored != computed {
            return Err(FormatError::HeaderChecksum { stored, computed });
        }
        let version = u16::from_le_bytes(array(h, 8));
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(FormatError::UnsupportedVersion { found: version });
        }
        Ok(Self {
            file_id: WalFileId(u64::from_le_bytes(array(h, 12))),
            first_sequence: SequenceNumber(u64::from_le_bytes(array(h, 20))),
        })
    }
}

/// A record as read from disk, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub sequence: SequenceNumber,
    pub kind: RecordKind,
    pub payload: &'a [u8],
}

/// Appends one framed record to `out`.
pub fn encode_record(
    out: &mut Vec<u8>,
    sequence: SequenceNumber,
    kind: RecordKind,
    payload: &[u8],
) {
    let len = u32::try_from(payload.len()).expect("payload length checked by the writer");
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&sequence.get().to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(&[0u8; 3]);
    out.extend_from_slice(payload);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&out[start..start + 4]);
    hasher.update(&out[start + 8..]);
    let crc = hasher.finalize();
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes the record at the start of `bytes`; returns it and its framed length.
pub fn decode_record(bytes: &[u8]) -> Result<(RecordRef<'_>, usize), FormatError> {
    let Some(h) = bytes.get(..RECORD_HEADER_LEN) else {
        return Err(FormatError::Truncated {
            needed: RECORD_HEADER_LEN,
            available: bytes.len(),
        });
    };
    let len = u32::from_le_bytes(array(h, 0)) as usize;
    if len > MAX_PAYLOAD_LEN {
        return Err(FormatError::Oversized { len });
    }
    let total = RECORD_HEADER_LEN + len;
    let Some(frame) = bytes.get(..total) else {
        return Err(FormatError::Truncated {
            needed: total,
            available: bytes.len(),
        });
    };
    let stored = u32::from_le_bytes(array(frame, 4));
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&frame[0..4]);
    hasher.update(&frame[8..]);
    let computed = hasher.finalize();
    if stored != computed {
        return Err(FormatError::RecordChecksum { stored, computed });
    }
    let kind_byte = frame[16];
    let kind =
        RecordKind::from_u8(kind_byte).ok_or(FormatError::UnknownKind { kind: kind_byte })?;
    let record = RecordRef {
        sequence: SequenceNumber(u64::from_le_bytes(array(frame, 8))),
        kind,
        payload: &frame[RECORD_HEADER_LEN..],
    };
    Ok((record, total))
}

/// Copies `N` bytes at `offset`; callers have bounds-checked the slice.
fn array<const N: usize>(bytes: &[u8], offset: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[offset..offset + N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_golden_bytes() {
        let h = FileHeader {
            file_id: WalFileId(7),
            first_sequence: SequenceNumber(42),
        };
        let bytes = h.encode();
        assert_eq!(&bytes[0..8], b"KILNWAL\0");
        assert_eq!(&bytes[8..10], &[1, 0]);
        assert_eq!(&bytes[12..20], &[7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[20..28], &[42, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(FileHeader::decode(&bytes), Ok(h));
    }

    #[test]
    fn header_corruption_matrix() {
        let good = FileHeader {
            file_id: WalFileId(1),
            first_sequence: SequenceNumber(1),
        }
        .encode();
        assert_eq!(
            FileHeader::decode(&[]),
            Err(FormatError::ShortHeader { len: 0 })
        );
        assert_eq!(
            FileHeader::decode(&good[..31]),
            Err(FormatError::ShortHeader { len: 31 })
        );
        let mut bad_magic = good;
        bad_magic[0] = b'X';
        assert!(matches!(
            FileHeader::decode(&bad_magic),
            Err(FormatError::BadMagic { .. })
        ));
        for i in 8..32 {
            let mut flipped = good;
            flipped[i] ^= 0x01;
            assert!(
                matches!(
                    FileHeader::decode(&flipped),
                    Err(FormatError::HeaderChecksum { .. })
                ),
                "flip at {i}"
            );
        }
        let mut v2 = good;
        v2[8] = 2;
        let crc = crc32fast::hash(&v2[0..28]);
        v2[28..32].copy_from_slice(&crc.to_le_bytes());
        let err = FileHeader::decode(&v2).unwrap_err();
        assert_eq!(err, FormatError::UnsupportedVersion { found: 2 });
        assert!(err.to_string().contains("supported versions: [1]"));
    }

    #[test]
    fn record_golden_bytes_and_round_trip() {
        let mut buf = Vec::new();
        encode_record(&mut buf, SequenceNumber(3), RecordKind::WriteBatch, b"abc");
        assert_eq!(buf.len(), RECORD_HEADER_LEN + 3);
        assert_eq!(&buf[0..4], &[3, 0, 0, 0]);
        assert_eq!(&buf[8..16], &[3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(buf[16], 1);
        assert_eq!(&buf[20..], b"abc");
        let (rec, used) = decode_record(&buf).unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(rec.sequence, SequenceNumber(3));
        assert_eq!(rec.payload, b"abc");
    }

    #[test]
    fn record_corruption_matrix() {
        let mut buf = Vec::new();
        encode_record(
            &mut buf,
            SequenceNumber(9),
            RecordKind::WriteBatch,
            b"payload",
        );
        // Every cut is detected as truncation.
        for cut in 0..buf.len() {
            assert!(
                matches!(
                    decode_record(&buf[..cut]),
                    Err(FormatError::Truncated { .. })
                ),
                "cut at {cut}"
            );
        }
        // Every single flipped bit in the frame or payload is detected.
        for i in 0..buf.len() {
            let mut flipped = buf.clone();
            flipped[i] ^= 0x10;
            assert!(decode_record(&flipped).is_err(), "flip at byte {i}");
        }
        // A length claiming more than is there.
        let mut long = buf.clone();
        long[0..4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            decode_record(&long),
            Err(FormatError::Truncated { .. })
        ));
        let mut huge = buf.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_record(&huge),
            Err(FormatError::Oversized { .. })
        ));
    }
}
