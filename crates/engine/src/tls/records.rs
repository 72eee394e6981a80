//! The record layer once the handshake is done, TLS 1.3 (RFC 8446 §5)
//! and TLS 1.2 (RFC 5246 §6.2, its AEAD suites: RFC 5288, RFC 7905): gale
//! seals and opens the records itself, with the traffic keys rustls
//! derived in the handshake (rustls's kernel API, made for kTLS).
//!
//! What this buys is memory. rustls keeps, for a connection's whole life,
//! its connection object (about 1 KiB) and both directions' expanded
//! cipher state (about 0.55 KiB each with AES-GCM). Here an idle
//! connection keeps the keys' bytes and the two sequence numbers, and on
//! TLS 1.3 the two traffic secrets, from which gale derives the keys of a
//! key update itself (RFC 8446 §7.2; rustls logs the secrets to gale in
//! the handshake, through its key log, and nothing of rustls is kept); a
//! key is expanded for one batch of records (one write, or what one read
//! brought) and let go with it. Expanding costs about 0.16 µs with
//! AES-GCM, once per batch.
//!
//! The rules kept for TLS 1.3, as rustls keeps them:
//! - After the handshake every record is an encrypted `application_data`
//!   record of at most 2^14 + 256 bytes; its inner plaintext at most
//!   2^14 bytes, its content type the last non-zero byte.
//! - Alerts: `close_notify` ends the peer's side (what follows it is
//!   ignored); a warning `user_canceled` is let by, 4 warnings at most;
//!   anything else ends the connection.
//! - The only handshake message a client may send now is `KeyUpdate`: it
//!   must end its record; the read keys move on, and when the client asks,
//!   gale answers with its own `KeyUpdate` and moves its write keys on:
//!   before its next record, or at once when nothing of ours is waiting
//!   to be written. Requests that come while an answer waits get that one
//!   answer (RFC 8446 §4.6.3), so a client that asks and never reads
//!   cannot pile answers up. 32 key updates in a row without application
//!   data end the connection, as do 32 empty records in a row.
//! - The write keys move on by themselves before the suite's
//!   confidentiality limit (2^24 records for AES-GCM), and before a
//!   sequence number nears 2^64.
//! - A fault is answered with the fatal alert RFC 8446 names for it.
//!
//! For TLS 1.2, where rustls's rules differ:
//! - A record's type is in its header (alert, handshake or application
//!   data; a `change_cipher_spec` now is a fault), its ciphertext at most
//!   2^14 + 2048 bytes; with AES-GCM it begins with 8 bytes of the nonce.
//! - Any warning alert is let by, 4 at most.
//! - The only handshake message a client may send now is a `ClientHello`
//!   asking to renegotiate: the first is refused with a warning
//!   `no_renegotiation` (and skipped), a second ends the connection.
//! - There is no key update: at the suite's confidentiality limit (2^24
//!   records for AES-GCM) gale sends `close_notify` and the connection
//!   ends.

use std::fmt;
use std::io;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use rustls::crypto::hash::HashAlgorithm;
use rustls::server::UnbufferedServerConnection;
use rustls::{ConnectionTrafficSecrets, SupportedCipherSuite};
use zeroize::{Zeroize, Zeroizing};

/// Record and inner content types (RFC 8446 §5.1).
const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
/// Handshake message types: TLS 1.2's renegotiation (RFC 5246 §7.4.1.2)
/// and TLS 1.3's `KeyUpdate` (RFC 8446 §4.6.3).
const CLIENT_HELLO: u8 = 1;
const KEY_UPDATE: u8 = 24;

/// Alert descriptions (RFC 8446 §6).
const CLOSE_NOTIFY: u8 = 0;
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const ILLEGAL_PARAMETER: u8 = 47;
const DECODE_ERROR: u8 = 50;
const INTERNAL_ERROR: u8 = 80;
const USER_CANCELED: u8 = 90;
const NO_RENEGOTIATION: u8 = 100;

/// A record's header: type, legacy version, length.
const HEADER: usize = 5;
/// The AEAD tag of every TLS 1.3 suite.
const TAG: usize = 16;
/// Most plaintext in one record.
const MAX_PLAIN: usize = 1 << 14;
/// Most ciphertext in one record: TLS 1.3, TLS 1.2.
const MAX_CIPHERTEXT: usize = MAX_PLAIN + 256;
const MAX_CIPHERTEXT_TLS12: usize = MAX_PLAIN + 2048;
/// The part of the nonce a TLS 1.2 AES-GCM record carries (RFC 5288 §3).
const EXPLICIT_NONCE: usize = 8;
/// A sequence number this close to 2^64 ends the connection (rustls's
/// own margin).
const SEQ_LIMIT: u64 = 0xffff_ffff_ffff_0000;
/// Key updates allowed in a row without application data between them
/// (rustls's and BoringSSL's figure).
const KEY_UPDATES_ALLOWED: u8 = 32;
/// Warning alerts allowed on a connection (the same).
const WARNINGS_ALLOWED: u8 = 4;
/// Empty records allowed in a row (the same).
const EMPTY_ALLOWED: u8 = 32;
/// TLS 1.2 renegotiations refused before the next ends the connection
/// (rustls's figure).
const RENEGOTIATIONS_REFUSED: u8 = 1;
/// `KeyUpdate`, the peer not asked to update in turn.
const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [KEY_UPDATE, 0, 0, 1, 0];

/// A fault in what the peer sent: the alert to answer with (none to a
/// peer's own fatal alert), and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fatal {
    pub(super) alert: Option<u8>,
    pub(super) why: &'static str,
}

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.why)
    }
}

fn fatal(alert: u8, why: &'static str) -> Fatal {
    Fatal {
        alert: Some(alert),
        why,
    }
}

fn invalid(e: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

/// How a connection's records are laid out and sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// TLS 1.3: every record's outer type is application data, the real
    /// one sealed inside it; the header is the additional data.
    Tls13 = 0,
    /// TLS 1.2 with ChaCha20-Poly1305 (RFC 7905): the type in the header,
    /// the nonce from the IV and the sequence number alone.
    Tls12 = 1,
    /// TLS 1.2 with AES-GCM (RFC 5288): the type in the header, and the
    /// last 8 bytes of the nonce sent before the ciphertext.
    Tls12Explicit = 2,
}

/// One direction's traffic key, kept as bytes, and its sequence number.
struct Keys {
    alg: &'static aead::Algorithm,
    layout: Layout,
    key: [u8; 32],
    /// TLS 1.2 with AES-GCM: the 4-byte salt, then the 8 bytes rustls
    /// starts the explicit part of the nonce from.
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Keys {
    fn new(seq: u64, secrets: &ConnectionTrafficSecrets, tls12: bool) -> io::Result<Self> {
        let (alg, key, iv, layout) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&aead::AES_128_GCM, key, iv, Layout::Tls12Explicit)
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&aead::AES_256_GCM, key, iv, Layout::Tls12Explicit)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv, Layout::Tls12)
            }
            _ => return Err(invalid("a cipher suite gale does not seal itself")),
        };
        let layout = if tls12 { layout } else { Layout::Tls13 };
        let (key, iv) = (key.as_ref(), iv.as_ref());
        if key.len() != alg.key_len() || iv.len() != aead::NONCE_LEN {
            return Err(invalid("traffic keys of the wrong length"));
        }
        let mut keys = Keys::empty(alg, layout, seq);
        keys.key[..key.len()].copy_from_slice(key);
        keys.iv.copy_from_slice(iv);
        Ok(keys)
    }

    /// TLS 1.3's key and IV for `alg` from a traffic secret (RFC 8446
    /// §7.3), from record `seq` on.
    fn derive(
        secret: &[u8],
        hash: hkdf::Algorithm,
        alg: &'static aead::Algorithm,
        seq: u64,
    ) -> io::Result<Self> {
        let mut keys = Keys::empty(alg, Layout::Tls13, seq);
        expand_label(hash, secret, b"key", &mut keys.key[..alg.key_len()])?;
        expand_label(hash, secret, b"iv", &mut keys.iv)?;
        Ok(keys)
    }

    fn empty(alg: &'static aead::Algorithm, layout: Layout, seq: u64) -> Self {
        Keys {
            alg,
            layout,
            key: [0; 32],
            iv: [0; aead::NONCE_LEN],
            seq,
        }
    }

    /// Whether `other` holds the same key and IV.
    fn same_as(&self, other: &Keys) -> bool {
        self.alg == other.alg && self.key == other.key && self.iv == other.iv
    }

    /// The key, expanded for a batch of records.
    fn expand(&self) -> io::Result<LessSafeKey> {
        UnboundKey::new(self.alg, &self.key[..self.alg.key_len()])
            .map(LessSafeKey::new)
            .map_err(|_| invalid("a traffic key that does not expand"))
    }

    /// The next record's nonce (RFC 8446 §5.3, and as rustls makes TLS
    /// 1.2's): the IV, its last 8 bytes XORed with the sequence number.
    fn nonce(&self) -> [u8; aead::NONCE_LEN] {
        let mut nonce = self.iv;
        for (b, s) in nonce[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *b ^= s;
        }
        nonce
    }

    /// The next record's additional data, and its length: TLS 1.3's is
    /// the record's header (RFC 8446 §5.2); TLS 1.2's the sequence number,
    /// the record's type and version, the plaintext's length (RFC 5246
    /// §6.2.3.3).
    fn aad(&self, header: [u8; HEADER], plain_len: usize) -> ([u8; 13], usize) {
        let mut aad = [0; 13];
        if self.layout == Layout::Tls13 {
            aad[..HEADER].copy_from_slice(&header);
            return (aad, HEADER);
        }
        aad[..8].copy_from_slice(&self.seq.to_be_bytes());
        aad[8..11].copy_from_slice(&header[..3]);
        aad[11..].copy_from_slice(&(plain_len as u16).to_be_bytes());
        (aad, aad.len())
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.key.zeroize();
        self.iv.zeroize();
    }
}

/// The longest traffic secret: SHA-384's output.
const MAX_SECRET: usize = 48;

/// A TLS 1.3 connection's application traffic secrets (RFC 8446 §7.1),
/// from which each key update derives the next, and its key and IV
/// (§7.2).
struct Secrets {
    hash: hkdf::Algorithm,
    len: u8,
    client: [u8; MAX_SECRET],
    server: [u8; MAX_SECRET],
}

impl Secrets {
    /// Moves the client's secret (`client`) or ours on, and returns the
    /// keys that follow from it.
    fn update(&mut self, client: bool, alg: &'static aead::Algorithm) -> io::Result<Keys> {
        let len = usize::from(self.len);
        let secret = if client {
            &mut self.client
        } else {
            &mut self.server
        };
        let mut next = [0; MAX_SECRET];
        expand_label(self.hash, &secret[..len], b"traffic upd", &mut next[..len])?;
        secret.copy_from_slice(&next);
        next.zeroize();
        Keys::derive(&secret[..len], self.hash, alg, 0)
    }
}

impl Drop for Secrets {
    fn drop(&mut self) {
        self.client.zeroize();
        self.server.zeroize();
    }
}

/// HKDF-Expand-Label(`secret`, `label`, "", `out.len()`) (RFC 8446 §7.1).
fn expand_label(
    hash: hkdf::Algorithm,
    secret: &[u8],
    label: &[u8],
    out: &mut [u8],
) -> io::Result<()> {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let length = (out.len() as u16).to_be_bytes();
    let label_len = [(b"tls13 ".len() + label.len()) as u8];
    let info: [&[u8]; 5] = [&length, &label_len, b"tls13 ", label, &[0]];
    hkdf::Prk::new_less_safe(hash, secret)
        .expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .map_err(|_| invalid("a traffic key that does not derive"))
}

/// A connection's record layer, after the handshake (see the module's
/// doc).
pub(crate) struct Records {
    /// TLS 1.3's traffic secrets, for key updates (TLS 1.2 has none).
    secrets: Option<Secrets>,
    tx: Keys,
    rx: Keys,
    /// Records sealed under one key before it is updated.
    limit: u64,
    /// A handshake message's start not yet whole, split over records: a
    /// `KeyUpdate` (5 bytes), or a renegotiating `ClientHello`'s header (4).
    handshake: [u8; 5],
    handshake_len: u8,
    /// TLS 1.2: what is left of a refused `ClientHello`, skipped.
    skip: u32,
    renegotiations_refused: u8,
    key_updates_allowed: u8,
    warnings_allowed: u8,
    empty_allowed: u8,
    /// The peer asked for a key update (TLS 1.3) or to renegotiate (TLS
    /// 1.2) and has not had our answer.
    answer_owed: bool,
    /// The peer's `close_notify` came.
    closed: bool,
    /// Ours is sealed: nothing follows it.
    closing: bool,
    /// How often the write keys moved on, for tests.
    #[cfg(test)]
    write_updates: u32,
}

impl Records {
    /// Takes over from rustls: its handshake must be done and everything
    /// it had to send sent; on TLS 1.3, `client` and `server` are the
    /// application traffic secrets rustls logged in the handshake.
    ///
    /// rustls must not have read any record under the traffic keys but,
    /// on TLS 1.2, the client's `Finished`: then no answer of its own to
    /// a key update, no part of a handshake message and no `close_notify`
    /// can be left inside it.
    pub(super) fn new(
        conn: UnbufferedServerConnection,
        client: &[u8],
        server: &[u8],
    ) -> io::Result<Self> {
        let (keys, kernel) = conn.dangerous_into_kernel_connection().map_err(invalid)?;
        let (hash, limit, read) = match kernel.negotiated_cipher_suite() {
            SupportedCipherSuite::Tls13(suite) => {
                let hash = match suite.common.hash_provider.algorithm() {
                    HashAlgorithm::SHA256 => hkdf::HKDF_SHA256,
                    HashAlgorithm::SHA384 => hkdf::HKDF_SHA384,
                    _ => return Err(invalid("a hash gale does not derive keys with")),
                };
                (Some(hash), suite.common.confidentiality_limit, 0)
            }
            SupportedCipherSuite::Tls12(suite) => (None, suite.common.confidentiality_limit, 1),
        };
        // Nothing of rustls is kept.
        drop(kernel);
        let tls12 = hash.is_none();
        let (tx_seq, tx) = &keys.tx;
        let (rx_seq, rx) = &keys.rx;
        // TLS 1.2's Finished may follow a warning alert, or span records.
        if *rx_seq != read && (hash.is_some() || *rx_seq < read) {
            return Err(invalid("records were read before the hand-over"));
        }
        let (tx, rx) = (
            Keys::new(*tx_seq, tx, tls12)?,
            Keys::new(*rx_seq, rx, tls12)?,
        );
        let secrets = match hash {
            None => None,
            Some(hash) => {
                let len = hkdf::KeyType::len(&hash);
                if client.len() != len || server.len() != len || len > MAX_SECRET {
                    return Err(invalid("no traffic secrets from the handshake"));
                }
                let mut secrets = Secrets {
                    hash,
                    len: len as u8,
                    client: [0; MAX_SECRET],
                    server: [0; MAX_SECRET],
                };
                secrets.client[..len].copy_from_slice(client);
                secrets.server[..len].copy_from_slice(server);
                // The secrets are this connection's: they give rustls's
                // keys.
                let ours = Keys::derive(server, hash, tx.alg, tx.seq)?;
                let theirs = Keys::derive(client, hash, rx.alg, rx.seq)?;
                if !ours.same_as(&tx) || !theirs.same_as(&rx) {
                    return Err(invalid(
                        "traffic secrets that do not give the handshake's keys",
                    ));
                }
                Some(secrets)
            }
        };
        Ok(Records {
            tx,
            rx,
            secrets,
            limit: limit.min(SEQ_LIMIT),
            handshake: [0; 5],
            handshake_len: 0,
            skip: 0,
            renegotiations_refused: 0,
            key_updates_allowed: KEY_UPDATES_ALLOWED,
            // Warnings rustls let by before the Finished count.
            warnings_allowed: WARNINGS_ALLOWED
                - rx_seq.saturating_sub(read).min(u64::from(WARNINGS_ALLOWED)) as u8,
            empty_allowed: EMPTY_ALLOWED,
            answer_owed: false,
            closed: false,
            closing: false,
            #[cfg(test)]
            write_updates: 0,
        })
    }

    /// Whether the peer's `close_notify` came.
    pub(super) fn peer_closed(&self) -> bool {
        self.closed
    }

    /// Whether our `close_notify` is sealed: nothing more is.
    pub(super) fn closing(&self) -> bool {
        self.closing
    }

    /// The whole state, as bytes, for a takeover: the next process goes
    /// on from it ([`Records::import`]). They hold the keys and secrets,
    /// and are zeroized when dropped.
    pub(super) fn export(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(EXPORTED));
        out.push(EXPORT_FORMAT);
        for keys in [&self.tx, &self.rx] {
            let alg = ALGORITHMS.iter().position(|a| *a == keys.alg).unwrap_or(0);
            out.push(alg as u8);
            out.push(keys.layout as u8);
            out.extend_from_slice(&keys.key);
            out.extend_from_slice(&keys.iv);
            out.extend_from_slice(&keys.seq.to_be_bytes());
        }
        match &self.secrets {
            None => out.push(0),
            Some(secrets) => {
                out.push(if secrets.hash == hkdf::HKDF_SHA384 {
                    2
                } else {
                    1
                });
                out.extend_from_slice(&secrets.client);
                out.extend_from_slice(&secrets.server);
            }
        }
        out.extend_from_slice(&self.limit.to_be_bytes());
        out.extend_from_slice(&self.handshake);
        out.push(self.handshake_len);
        out.extend_from_slice(&self.skip.to_be_bytes());
        out.extend_from_slice(&[
            self.renegotiations_refused,
            self.key_updates_allowed,
            self.warnings_allowed,
            self.empty_allowed,
            u8::from(self.answer_owed),
            u8::from(self.closed),
            u8::from(self.closing),
        ]);
        out
    }

    /// A record layer going on from what [`Records::export`] gave in
    /// another process; anything malformed or inconsistent is refused.
    pub(super) fn import(bytes: &[u8]) -> io::Result<Records> {
        let bad = |why: &str| invalid(format!("a taken-over record layer: {why}"));
        let mut r = Reader(bytes);
        if r.u8()? != EXPORT_FORMAT {
            return Err(bad("another format"));
        }
        let mut keys = || -> io::Result<Keys> {
            let alg = *ALGORITHMS
                .get(usize::from(r.u8()?))
                .ok_or_else(|| bad("an unknown cipher"))?;
            let layout = match r.u8()? {
                0 => Layout::Tls13,
                1 => Layout::Tls12,
                2 => Layout::Tls12Explicit,
                _ => return Err(bad("an unknown layout")),
            };
            let mut keys = Keys::empty(alg, layout, 0);
            keys.key = r.array()?;
            keys.iv = r.array()?;
            keys.seq = r.u64()?;
            Ok(keys)
        };
        let (tx, rx) = (keys()?, keys()?);
        let secrets = match r.u8()? {
            0 => None,
            code @ (1 | 2) => {
                let hash = if code == 2 {
                    hkdf::HKDF_SHA384
                } else {
                    hkdf::HKDF_SHA256
                };
                // Wiped if the second is not there.
                let client = Zeroizing::new(r.array::<MAX_SECRET>()?);
                Some(Secrets {
                    hash,
                    len: hkdf::KeyType::len(&hash) as u8,
                    client: *client,
                    server: r.array()?,
                })
            }
            _ => return Err(bad("an unknown hash")),
        };
        let records = Records {
            limit: r.u64()?,
            handshake: r.array()?,
            handshake_len: r.u8()?,
            skip: u32::from_be_bytes(r.array()?),
            renegotiations_refused: r.u8()?,
            key_updates_allowed: r.u8()?,
            warnings_allowed: r.u8()?,
            empty_allowed: r.u8()?,
            answer_owed: r.flag()?,
            closed: r.flag()?,
            closing: r.flag()?,
            secrets,
            tx,
            rx,
            #[cfg(test)]
            write_updates: 0,
        };
        if !r.0.is_empty() || !records.consistent() {
            return Err(bad("an inconsistent state"));
        }
        Ok(records)
    }

    /// Whether a state [`Records::import`] read could be one
    /// [`Records::export`] wrote of a connection that could move: every
    /// field in its range and agreeing with the others, so that nothing
    /// after it can fail on what it was given.
    fn consistent(&self) -> bool {
        let (tx, rx) = (&self.tx, &self.rx);
        let aes = tx.alg != &aead::CHACHA20_POLY1305;
        let tls13 = tx.layout == Layout::Tls13;
        let layout_fits = tls13 || (tx.layout == Layout::Tls12Explicit) == aes;
        // What a key update derives from: TLS 1.3's alone, and its hash
        // the suite's (SHA-384 with AES-256-GCM).
        let secrets_fit = match &self.secrets {
            None => !tls13,
            Some(s) => {
                let sha384 = tx.alg == &aead::AES_256_GCM;
                let len = usize::from(s.len);
                tls13
                    && (s.hash == hkdf::HKDF_SHA384) == sha384
                    && s.client[len..].iter().all(|&b| b == 0)
                    && s.server[len..].iter().all(|&b| b == 0)
            }
        };
        // A handshake message begun rests with at most 4 bytes of a key
        // update (TLS 1.3) or 3 of a ClientHello's header (TLS 1.2), and
        // a refused ClientHello is skipped only after its header.
        let begun_fits = if tls13 {
            self.handshake_len < 5 && self.skip == 0
        } else {
            self.handshake_len < 4 && (self.skip == 0 || self.handshake_len == 0)
        };
        tx.alg == rx.alg
            && tx.layout == rx.layout
            && [tx, rx]
                .iter()
                .all(|k| k.key[k.alg.key_len()..].iter().all(|&b| b == 0))
            && layout_fits
            && secrets_fit
            && begun_fits
            && self.skip <= 0xffff
            && self.limit <= SEQ_LIMIT
            && self.renegotiations_refused <= RENEGOTIATIONS_REFUSED
            && self.key_updates_allowed <= KEY_UPDATES_ALLOWED
            && self.warnings_allowed <= WARNINGS_ALLOWED
            && self.empty_allowed <= EMPTY_ALLOWED
            // A close begun does not move.
            && !self.closed
            && !self.closing
    }

    /// Seals `data` as application data into `out` (records of 2^14
    /// bytes at most).
    pub(super) fn seal(&mut self, data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        self.seal_as(APPLICATION_DATA, data, out)
    }

    /// Seals our `close_notify` into `out`: the last record we send.
    pub(super) fn close_notify(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        self.seal_as(ALERT, &[1, CLOSE_NOTIFY], out)?;
        self.closing = true;
        Ok(())
    }

    /// Seals the answer the peer asked for, if it is owed, into `out`
    /// (the caller does this when nothing of ours waits to be written).
    pub(super) fn answer(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        if self.answer_owed && !self.closing {
            let key = self.tx.expand()?;
            self.pay_answer(key, out)?;
        }
        Ok(())
    }

    /// Seals the answer owed under `key`: a key update (TLS 1.3; returns
    /// the new key) or a refused renegotiation (TLS 1.2).
    fn pay_answer(&mut self, key: LessSafeKey, out: &mut Vec<u8>) -> io::Result<LessSafeKey> {
        if !self.tls12() {
            return self.update_tx(&key, out);
        }
        seal_one(&mut self.tx, &key, ALERT, &[1, NO_RENEGOTIATION], out)?;
        self.answer_owed = false;
        Ok(key)
    }

    /// Seals a fatal alert into `out`, as far as that can still be done.
    pub(super) fn fatal_alert(&mut self, alert: u8, out: &mut Vec<u8>) {
        let _ = self.seal_as(ALERT, &[2, alert], out);
    }

    fn seal_as(&mut self, typ: u8, data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        if self.closing {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let mut key = self.tx.expand()?;
        if self.answer_owed {
            key = self.pay_answer(key, out)?;
        }
        if self.tls12() && typ == APPLICATION_DATA {
            // No key update in TLS 1.2: before the limit the connection
            // ends, as rustls ends it, this write and `close_notify` the
            // last that fit.
            let records = data.len().div_ceil(MAX_PLAIN) as u64;
            if self.tx.seq.saturating_add(records + 1) > self.limit {
                seal_one(&mut self.tx, &key, ALERT, &[1, CLOSE_NOTIFY], out)?;
                self.closing = true;
                return Err(invalid("the write key's confidentiality limit: closed"));
            }
        }
        for chunk in data.chunks(MAX_PLAIN) {
            // Moved on before the limit: this record and the key update
            // both fit under the old key.
            if !self.tls12() && self.tx.seq.saturating_add(2) > self.limit {
                key = self.update_tx(&key, out)?;
            }
            seal_one(&mut self.tx, &key, typ, chunk, out)?;
        }
        Ok(())
    }

    /// Tells the peer our write keys move on (sealed under the old key),
    /// and moves them on; returns the new key, expanded.
    fn update_tx(&mut self, key: &LessSafeKey, out: &mut Vec<u8>) -> io::Result<LessSafeKey> {
        seal_one(&mut self.tx, key, HANDSHAKE, &KEY_UPDATE_NOT_REQUESTED, out)?;
        self.answer_owed = false;
        #[cfg(test)]
        {
            self.write_updates += 1;
        }
        let alg = self.tx.alg;
        let secrets = self
            .secrets
            .as_mut()
            .ok_or_else(|| invalid("no key update"))?;
        self.tx = secrets.update(false, alg)?;
        self.tx.expand()
    }

    /// Opens the whole records at the front of `incoming` (in place),
    /// application data to `plain`, up to the peer's `close_notify` if it
    /// comes; returns how many bytes of records were used.
    pub(super) fn open(
        &mut self,
        incoming: &mut [u8],
        plain: &mut Vec<u8>,
    ) -> Result<usize, Fatal> {
        let mut used = 0;
        let mut key: Option<LessSafeKey> = None;
        let layout = self.rx.layout;
        while !self.closed {
            let rest = &mut incoming[used..];
            let Some(header) = rest.first_chunk::<HEADER>().copied() else {
                break;
            };
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            let most = if layout == Layout::Tls13 {
                if header[0] != APPLICATION_DATA {
                    return Err(fatal(
                        UNEXPECTED_MESSAGE,
                        "a record not encrypted after the handshake",
                    ));
                }
                MAX_CIPHERTEXT
            } else {
                match header[0] {
                    APPLICATION_DATA | ALERT | HANDSHAKE => {}
                    CHANGE_CIPHER_SPEC => {
                        return Err(fatal(
                            UNEXPECTED_MESSAGE,
                            "a change_cipher_spec after the handshake",
                        ));
                    }
                    _ => {
                        return Err(fatal(UNEXPECTED_MESSAGE, "a record of an unexpected type"));
                    }
                }
                MAX_CIPHERTEXT_TLS12
            };
            if len > most {
                return Err(fatal(RECORD_OVERFLOW, "a record too large"));
            }
            let Some(sealed) = rest.get_mut(HEADER..HEADER + len) else {
                break;
            };
            if self.rx.seq >= SEQ_LIMIT {
                return Err(fatal(INTERNAL_ERROR, "too many records under one key"));
            }
            let opening = match &key {
                Some(k) => k,
                None => key.insert(
                    self.rx
                        .expand()
                        .map_err(|_| fatal(INTERNAL_ERROR, "a key that does not expand"))?,
                ),
            };
            let explicit = if layout == Layout::Tls12Explicit {
                EXPLICIT_NONCE
            } else {
                0
            };
            let undecryptable = || fatal(BAD_RECORD_MAC, "a record that does not decrypt");
            // Too short for its tag (and explicit nonce): what opening it
            // would say.
            let plain_len = len.checked_sub(explicit + TAG).ok_or_else(undecryptable)?;
            let mut nonce = self.rx.nonce();
            if explicit > 0 {
                nonce[aead::NONCE_LEN - EXPLICIT_NONCE..]
                    .copy_from_slice(&sealed[..EXPLICIT_NONCE]);
            }
            let (aad, aad_len) = self.rx.aad(header, plain_len);
            let opened = opening
                .open_within(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&aad[..aad_len]),
                    sealed,
                    explicit..,
                )
                .map_err(|_| undecryptable())?;
            self.rx.seq += 1;
            used += HEADER + len;
            // TLS 1.3's content type is the last byte that is not padding;
            // TLS 1.2's is the header's.
            let (typ, content) = if layout == Layout::Tls13 {
                if opened.len() > MAX_PLAIN + 1 {
                    return Err(fatal(RECORD_OVERFLOW, "a record's plaintext too large"));
                }
                let Some(end) = opened.iter().rposition(|&b| b != 0) else {
                    return Err(fatal(UNEXPECTED_MESSAGE, "a record with no content type"));
                };
                (opened[end], &opened[..end])
            } else {
                if opened.len() > MAX_PLAIN {
                    return Err(fatal(RECORD_OVERFLOW, "a record's plaintext too large"));
                }
                (header[0], &opened[..])
            };
            if content.is_empty() {
                if self.empty_allowed == 0 {
                    return Err(fatal(UNEXPECTED_MESSAGE, "too many empty records"));
                }
                self.empty_allowed -= 1;
            } else {
                self.empty_allowed = EMPTY_ALLOWED;
            }
            match typ {
                APPLICATION_DATA => {
                    if self.inside_handshake_message() {
                        return Err(fatal(
                            UNEXPECTED_MESSAGE,
                            "application data inside a handshake message",
                        ));
                    }
                    self.key_updates_allowed = KEY_UPDATES_ALLOWED;
                    plain.extend_from_slice(content);
                }
                ALERT => self.alert(content)?,
                HANDSHAKE if content.is_empty() => {
                    return Err(fatal(UNEXPECTED_MESSAGE, "an empty handshake record"));
                }
                HANDSHAKE if layout != Layout::Tls13 => self.renegotiation(content)?,
                HANDSHAKE => {
                    if self.handshake_message(content)? {
                        // The read keys moved on.
                        key = None;
                    }
                }
                _ => return Err(fatal(UNEXPECTED_MESSAGE, "a record of an unexpected type")),
            }
        }
        Ok(used)
    }

    /// Whether a handshake message begun in an earlier record is not yet
    /// whole.
    fn inside_handshake_message(&self) -> bool {
        self.handshake_len > 0 || self.skip > 0
    }

    fn alert(&mut self, content: &[u8]) -> Result<(), Fatal> {
        let &[level, description] = content else {
            return Err(fatal(DECODE_ERROR, "an alert that is not 2 bytes"));
        };
        if self.inside_handshake_message() {
            return Err(fatal(
                UNEXPECTED_MESSAGE,
                "an alert inside a handshake message",
            ));
        }
        if level != 1 && level != 2 {
            return Err(fatal(ILLEGAL_PARAMETER, "an alert of an unknown level"));
        }
        if description == CLOSE_NOTIFY {
            self.closed = true;
            return Ok(());
        }
        // TLS 1.2 lets any warning by; TLS 1.3 none but `user_canceled`.
        if level == 1 && (description == USER_CANCELED || self.tls12()) {
            if self.warnings_allowed == 0 {
                return Err(fatal(UNEXPECTED_MESSAGE, "too many warning alerts"));
            }
            self.warnings_allowed -= 1;
            return Ok(());
        }
        if level == 1 {
            return Err(fatal(DECODE_ERROR, "a warning alert TLS 1.3 does not have"));
        }
        Err(Fatal {
            alert: None,
            why: "the peer sent a fatal alert",
        })
    }

    /// Takes a handshake record's content: only `KeyUpdate` may come now.
    /// Returns whether the read keys moved on.
    fn handshake_message(&mut self, mut content: &[u8]) -> Result<bool, Fatal> {
        let mut updated = false;
        while !content.is_empty() {
            if updated {
                return Err(fatal(
                    UNEXPECTED_MESSAGE,
                    "a key update not at the end of its record",
                ));
            }
            let have = self.gather(
                &mut content,
                self.handshake.len(),
                KEY_UPDATE,
                "a handshake message other than a key update",
            )?;
            if have >= 4 && self.handshake[1..4] != [0, 0, 1] {
                return Err(fatal(DECODE_ERROR, "a key update of the wrong length"));
            }
            if have < self.handshake.len() {
                break;
            }
            self.handshake_len = 0;
            let requested = match self.handshake[4] {
                0 => false,
                1 => true,
                _ => return Err(fatal(ILLEGAL_PARAMETER, "a key update request unknown")),
            };
            if self.key_updates_allowed == 0 {
                return Err(fatal(UNEXPECTED_MESSAGE, "too many key updates"));
            }
            self.key_updates_allowed -= 1;
            // Answered before our next record (`seal_as`), or by `answer`.
            self.answer_owed |= requested;
            let not_updated = || fatal(INTERNAL_ERROR, "the read keys did not update");
            let alg = self.rx.alg;
            let secrets = self.secrets.as_mut().ok_or_else(not_updated)?;
            self.rx = secrets.update(true, alg).map_err(|_| not_updated())?;
            updated = true;
        }
        Ok(updated)
    }

    /// Gathers the start of a handshake message, `want` bytes of it, from
    /// `content` (moved past what is taken), across records, into
    /// `handshake`; a message of another type than `typ` is refused,
    /// `other` saying so. Returns how much of the start is there.
    fn gather(
        &mut self,
        content: &mut &[u8],
        want: usize,
        typ: u8,
        other: &'static str,
    ) -> Result<usize, Fatal> {
        let have = usize::from(self.handshake_len);
        let take = want.saturating_sub(have).min(content.len());
        self.handshake[have..have + take].copy_from_slice(&content[..take]);
        *content = &content[take..];
        let have = have + take;
        self.handshake_len = have as u8;
        if self.handshake[0] != typ {
            return Err(fatal(UNEXPECTED_MESSAGE, other));
        }
        Ok(have)
    }

    /// Takes a TLS 1.2 handshake record's content: only a `ClientHello`
    /// asking to renegotiate may come now. The first is refused (with a
    /// warning owed, sealed as `answer_owed` is) and skipped; the next
    /// ends the connection.
    fn renegotiation(&mut self, mut content: &[u8]) -> Result<(), Fatal> {
        while !content.is_empty() {
            if self.skip > 0 {
                let n = content.len().min(self.skip as usize);
                content = &content[n..];
                self.skip -= n as u32;
                continue;
            }
            // A message's header: its type, then its length in 3 bytes.
            let have = self.gather(
                &mut content,
                4,
                CLIENT_HELLO,
                "a handshake message other than a ClientHello",
            )?;
            if have < 4 {
                break;
            }
            self.handshake_len = 0;
            if self.renegotiations_refused == RENEGOTIATIONS_REFUSED {
                return Err(fatal(UNEXPECTED_MESSAGE, "a renegotiation asked again"));
            }
            let len =
                u32::from_be_bytes([0, self.handshake[1], self.handshake[2], self.handshake[3]]);
            // rustls's own bound on a handshake message.
            if len > 0xffff {
                return Err(fatal(DECODE_ERROR, "a handshake message too large"));
            }
            self.renegotiations_refused += 1;
            self.answer_owed = true;
            self.skip = len;
        }
        Ok(())
    }

    /// Sets the confidentiality limit, for tests of the key update.
    #[cfg(test)]
    pub(super) fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
    }

    /// How often the write keys moved on, for tests.
    #[cfg(test)]
    pub(super) fn write_updates(&self) -> u32 {
        self.write_updates
    }

    /// Whether the peer is owed an answer not yet sealed (a key update
    /// asked for, a renegotiation refused).
    pub(super) fn owes_answer(&self) -> bool {
        self.answer_owed && !self.closing
    }

    /// Whether these are TLS 1.2's records.
    pub(super) fn tls12(&self) -> bool {
        self.tx.layout != Layout::Tls13
    }

    /// The write side's sequence number, for tests: 0 after a key update.
    #[cfg(test)]
    pub(super) fn write_seq(&self) -> u64 {
        self.tx.seq
    }
}

/// The version of [`Records::export`]'s bytes.
const EXPORT_FORMAT: u8 = 1;
/// Their length.
const EXPORTED: usize =
    1 + 2 * (2 + 32 + aead::NONCE_LEN + 8) + 1 + 2 * MAX_SECRET + 8 + 5 + 1 + 4 + 7;
/// The ciphers, by their number in the exported bytes.
static ALGORITHMS: [&aead::Algorithm; 3] = [
    &aead::AES_128_GCM,
    &aead::AES_256_GCM,
    &aead::CHACHA20_POLY1305,
];

/// Reads [`Records::export`]'s bytes in order.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn array<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or_else(|| invalid("a taken-over record layer: too short"))?;
        self.0 = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> io::Result<u8> {
        self.array::<1>().map(|[b]| b)
    }

    fn u64(&mut self) -> io::Result<u64> {
        self.array().map(u64::from_be_bytes)
    }

    fn flag(&mut self) -> io::Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(invalid("a taken-over record layer: a flag not 0 or 1")),
        }
    }
}

/// Seals one record of `typ` holding `chunk` (2^14 bytes at most) into
/// `out`, under `key` and `keys`' next sequence number, laid out as
/// `keys` are.
fn seal_one(
    keys: &mut Keys,
    key: &LessSafeKey,
    typ: u8,
    chunk: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    if keys.seq >= SEQ_LIMIT {
        return Err(invalid("too many records under one key"));
    }
    let nonce = keys.nonce();
    let (outer, explicit, inner) = match keys.layout {
        Layout::Tls13 => (APPLICATION_DATA, 0, 1),
        Layout::Tls12 => (typ, 0, 0),
        Layout::Tls12Explicit => (typ, EXPLICIT_NONCE, 0),
    };
    let len = explicit + chunk.len() + inner + TAG;
    let [hi, lo] = (len as u16).to_be_bytes();
    let header = [outer, 3, 3, hi, lo];
    let (aad, aad_len) = keys.aad(header, chunk.len());
    out.reserve(HEADER + len);
    out.extend_from_slice(&header);
    out.extend_from_slice(&nonce[aead::NONCE_LEN - explicit..]);
    let start = out.len();
    out.extend_from_slice(chunk);
    if inner > 0 {
        out.push(typ);
    }
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad[..aad_len]),
            &mut out[start..],
        )
        .map_err(|_| invalid("a record that does not seal"))?;
    out.extend_from_slice(tag.as_ref());
    keys.seq += 1;
    Ok(())
}

/// Seals records as a client would, for tests that send what rustls's
/// client never would.
#[cfg(test)]
pub(super) struct Sealer(Keys);

#[cfg(test)]
impl Sealer {
    pub(super) fn new(seq: u64, secrets: &ConnectionTrafficSecrets, tls12: bool) -> Self {
        Sealer(Keys::new(seq, secrets, tls12).expect("keys"))
    }

    /// One record of type `typ` holding `content`.
    pub(super) fn seal(&mut self, typ: u8, content: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let key = self.0.expand().expect("key");
        seal_one(&mut self.0, &key, typ, content, &mut out).expect("seal");
        out
    }
}
