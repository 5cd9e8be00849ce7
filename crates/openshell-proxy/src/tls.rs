//! The first bytes of a passthrough tunnel: a TLS ClientHello and its server name (SNI).
//!
//! Only enough of TLS is read to find the `server_name` extension: the record layer
//! (handshake records, whose fragments are joined until the ClientHello is whole), the
//! ClientHello's fixed fields, and its extensions. Nothing is decrypted or changed; the bytes
//! are relayed as they came once the name is checked.

/// Largest ClientHello accepted (handshake message, all records together).
pub(crate) const MAX_HELLO: usize = 64 * 1024;

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
/// `encrypted_client_hello` (RFC 9849): the real server name is encrypted.
const EXT_ECH: u16 = 0xfe0d;

/// What the bytes so far are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Hello {
    /// Not a TLS handshake record.
    NotTls,
    /// A TLS handshake that needs more bytes.
    Incomplete,
    /// A whole ClientHello.
    Whole {
        /// The `host_name` of its `server_name` extension, as sent.
        sni: Option<String>,
        /// It carries an encrypted ClientHello (the name it shows is only the outer one).
        ech: bool,
    },
    /// A TLS handshake that is not a well-formed ClientHello.
    Malformed(&'static str),
}

/// Parse the start of a client's byte stream.
pub(crate) fn parse(buf: &[u8]) -> Hello {
    match buf.first() {
        None => return Hello::Incomplete,
        Some(&CONTENT_HANDSHAKE) => {}
        Some(_) => return Hello::NotTls,
    }
    // Join the handshake records' fragments until the message is whole.
    let mut message = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = buf.get(at..at + 5) else {
            return Hello::Incomplete;
        };
        if header[0] != CONTENT_HANDSHAKE {
            return Hello::Malformed("a record other than a handshake inside the ClientHello");
        }
        if header[1] != 3 {
            return Hello::Malformed("not a TLS record version");
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > 16384 + 256 {
            return Hello::Malformed("bad TLS record length");
        }
        let Some(fragment) = buf.get(at + 5..at + 5 + len) else {
            return Hello::Incomplete;
        };
        message.extend_from_slice(fragment);
        at += 5 + len;
        if message.len() >= 4 {
            if message[0] != HANDSHAKE_CLIENT_HELLO {
                return Hello::Malformed("the first handshake message is not a ClientHello");
            }
            let body = (usize::from(message[1]) << 16)
                | (usize::from(message[2]) << 8)
                | usize::from(message[3]);
            if body + 4 > MAX_HELLO {
                return Hello::Malformed("ClientHello too large");
            }
            if message.len() >= body + 4 {
                return client_hello(&message[4..body + 4]);
            }
        }
        if at >= MAX_HELLO {
            return Hello::Malformed("ClientHello too large");
        }
    }
}

/// A cursor over a ClientHello body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

fn client_hello(body: &[u8]) -> Hello {
    let malformed = Hello::Malformed("malformed ClientHello");
    let mut r = Reader(body);
    // legacy_version, random, legacy_session_id, cipher_suites, legacy_compression_methods
    let fixed = (|| {
        r.take(2)?;
        r.take(32)?;
        let session = r.vec8()?;
        let suites = r.vec16()?;
        let compression = r.vec8()?;
        Some((
            session.len() <= 32,
            suites.len() >= 2 && suites.len() % 2 == 0,
            !compression.is_empty(),
        ))
    })();
    match fixed {
        Some((true, true, true)) => {}
        _ => return malformed,
    }
    if r.0.is_empty() {
        return Hello::Whole {
            sni: None,
            ech: false,
        };
    }
    let Some(extensions) = r.vec16() else {
        return malformed;
    };
    if !r.0.is_empty() {
        return malformed;
    }
    let mut r = Reader(extensions);
    let (mut sni, mut seen_sni, mut ech) = (None, false, false);
    while !r.0.is_empty() {
        let (Some(kind), Some(data)) = (r.u16(), r.vec16()) else {
            return malformed;
        };
        match kind {
            EXT_SERVER_NAME => {
                if seen_sni {
                    return Hello::Malformed("two server_name extensions");
                }
                seen_sni = true;
                match server_name(data) {
                    Ok(name) => sni = name,
                    Err(why) => return Hello::Malformed(why),
                }
            }
            EXT_ECH => ech = true,
            _ => {}
        }
    }
    Hello::Whole { sni, ech }
}

/// The `host_name` entry of a `server_name` extension (RFC 6066: at most one).
fn server_name(data: &[u8]) -> Result<Option<String>, &'static str> {
    let mut r = Reader(data);
    let list = r.vec16().ok_or("malformed server_name")?;
    if !r.0.is_empty() {
        return Err("malformed server_name");
    }
    let mut r = Reader(list);
    let mut name = None;
    while !r.0.is_empty() {
        let kind = r.u8().ok_or("malformed server_name")?;
        let value = r.vec16().ok_or("malformed server_name")?;
        if kind != 0 {
            continue;
        }
        if name.is_some() {
            return Err("two host names in server_name");
        }
        let text = std::str::from_utf8(value).map_err(|_| "server name is not ascii")?;
        if text.is_empty()
            || text.len() > 255
            || !text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            return Err("server name is not a host name");
        }
        name = Some(text.to_string());
    }
    Ok(name)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    /// A minimal ClientHello record with the given extensions (type, data).
    pub(crate) fn hello_with(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend_from_slice(&kind.to_be_bytes());
            ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext.extend_from_slice(data);
        }
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        let mut rec = vec![CONTENT_HANDSHAKE, 3, 1];
        rec.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        rec.extend_from_slice(&msg);
        rec
    }

    pub(crate) fn sni_ext(name: &str) -> (u16, Vec<u8>) {
        let mut entry = vec![0u8];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name.as_bytes());
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&entry);
        (EXT_SERVER_NAME, data)
    }

    #[test]
    fn finds_the_server_name() {
        let rec = hello_with(&[(10, vec![0, 2, 0, 29]), sni_ext("API.Example.com")]);
        assert_eq!(
            parse(&rec),
            Hello::Whole {
                sni: Some("API.Example.com".into()),
                ech: false
            }
        );
        // Every prefix is incomplete, never a wrong answer.
        for n in 0..rec.len() {
            assert_eq!(parse(&rec[..n]), Hello::Incomplete, "{n}");
        }
        assert_eq!(
            parse(&hello_with(&[])),
            Hello::Whole {
                sni: None,
                ech: false
            }
        );
        assert_eq!(
            parse(&hello_with(&[sni_ext("a.example"), (EXT_ECH, vec![0])])),
            Hello::Whole {
                sni: Some("a.example".into()),
                ech: true
            }
        );
    }

    #[test]
    fn a_hello_split_over_two_records() {
        let rec = hello_with(&[sni_ext("split.example")]);
        let msg = &rec[5..];
        let (a, b) = msg.split_at(20);
        let mut two = vec![CONTENT_HANDSHAKE, 3, 1];
        two.extend_from_slice(&(a.len() as u16).to_be_bytes());
        two.extend_from_slice(a);
        two.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1]);
        two.extend_from_slice(&(b.len() as u16).to_be_bytes());
        two.extend_from_slice(b);
        assert_eq!(
            parse(&two),
            Hello::Whole {
                sni: Some("split.example".into()),
                ech: false
            }
        );
    }

    #[test]
    fn other_bytes() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(parse(b"SSH-2.0-x\r\n"), Hello::NotTls);
        assert_eq!(
            parse(&[22, 3, 1, 0, 4, 2, 0, 0, 0]),
            Hello::Malformed("the first handshake message is not a ClientHello")
        );
        assert_eq!(
            parse(&hello_with(&[sni_ext("a.example"), sni_ext("b.example")])),
            Hello::Malformed("two server_name extensions")
        );
        assert_eq!(
            parse(&hello_with(&[sni_ext("bad name")])),
            Hello::Malformed("server name is not a host name")
        );
    }
}
