//! NBD wire constants and the fixed-size structures of the protocol, parsed without I/O so
//! they can be unit-tested and fuzzed.

/// "NBDMAGIC".
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT".
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured replies (never negotiated by us).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const CFLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const CFLAG_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// TLS (unsupported).
pub const OPT_STARTTLS: u32 = 5;
/// Export info without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Export info and enter transmission.
pub const OPT_GO: u32 = 7;
/// Structured replies (unsupported).
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// An export in a LIST reply.
pub const REP_SERVER: u32 = 2;
/// An information item in an INFO/GO reply.
pub const REP_INFO: u32 = 3;
/// Error bit of reply types.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Unsupported option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Refused by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Invalid option data.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// TLS required.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Unknown export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Option data too big.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Info types.
pub const INFO_EXPORT: u16 = 0;
/// Export name.
pub const INFO_NAME: u16 = 1;
/// Description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Read-only export.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// FLUSH supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// FUA supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// TRIM supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// WRITE_ZEROES supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Several connections may be used at once.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// WRITE_ZEROES must not deallocate.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// NBD errnos (values fixed by the protocol).
pub const EPERM: u32 = 1;
/// I/O error.
pub const EIO: u32 = 5;
/// Out of memory.
pub const ENOMEM: u32 = 12;
/// Invalid argument.
pub const EINVAL: u32 = 22;
/// No space.
pub const ENOSPC: u32 = 28;
/// Value too large.
pub const EOVERFLOW: u32 = 75;
/// Not supported.
pub const ENOTSUP: u32 = 95;
/// Shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Largest request payload we accept or send (32 MiB, as QEMU).
pub const MAX_REQUEST: u32 = 32 << 20;
/// Largest option payload we accept.
pub const MAX_OPTION: u32 = 64 << 10;
/// Largest export name (protocol limit).
pub const MAX_NAME: usize = 4096;

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;

/// Maps a host errno to the NBD errno set.
pub fn errno_to_nbd(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub cmd: u16,
    /// Cookie (handle) echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Why a request header is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Bad magic: the stream is out of sync; the connection must close.
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
}

impl Request {
    /// Parses a 28-byte request header.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Request, RequestError> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return Err(RequestError::BadMagic(magic));
        }
        let be64 = |s: &[u8]| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_be_bytes(a)
        };
        Ok(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            cmd: u16::from_be_bytes([b[6], b[7]]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            len: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Encodes a simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Parsed NBD_OPT_INFO / NBD_OPT_GO data: export name and requested info items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub name: String,
    /// Requested info types.
    pub items: Vec<u16>,
}

/// Parses the data of NBD_OPT_INFO / NBD_OPT_GO. `None` means malformed (reply ERR_INVALID).
pub fn parse_info_request(data: &[u8]) -> Option<InfoRequest> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    if name_len > MAX_NAME {
        return None;
    }
    let name_end = 4usize.checked_add(name_len)?;
    let name = std::str::from_utf8(data.get(4..name_end)?).ok()?.to_owned();
    let n = u16::from_be_bytes(data.get(name_end..name_end + 2)?.try_into().ok()?) as usize;
    let rest = data.get(name_end + 2..)?;
    if rest.len() != n * 2 {
        return None;
    }
    let items = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some(InfoRequest { name, items })
}

/// Encodes the data of NBD_OPT_INFO / NBD_OPT_GO.
pub fn encode_info_request(name: &str, items: &[u16]) -> Vec<u8> {
    let mut v = Vec::with_capacity(6 + name.len() + items.len() * 2);
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(items.len() as u16).to_be_bytes());
    for i in items {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// Encodes an option reply header + data.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_and_bad_magic() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            cmd: CMD_WRITE,
            cookie: 7,
            offset: 4096,
            len: 512,
        };
        assert_eq!(Request::parse(&r.encode()), Ok(r));
        let mut b = r.encode();
        b[0] = 0;
        assert!(matches!(Request::parse(&b), Err(RequestError::BadMagic(_))));
    }

    #[test]
    fn info_request_parsing_rejects_malformed() {
        let d = encode_info_request("disk", &[INFO_BLOCK_SIZE]);
        assert_eq!(
            parse_info_request(&d),
            Some(InfoRequest {
                name: "disk".into(),
                items: vec![3]
            })
        );
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None);
        assert_eq!(parse_info_request(&[0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(parse_info_request(&[]), None);
        let mut bad_utf8 = encode_info_request("ab", &[]);
        bad_utf8[4] = 0xff;
        assert_eq!(parse_info_request(&bad_utf8), None);
    }
}
