//! The takeover's wire: length-prefixed messages over a Unix stream
//! socket, each a JSON head and a binary tail, with file descriptors
//! (SCM_RIGHTS) riding on the message's first bytes.
//!
//! A message is a 9-byte prefix (the head's length and the tail's, both
//! u32 little-endian, and how many descriptors came with it), the head
//! and the tail. The prefix is sent with one `sendmsg` carrying the
//! descriptors and read with one `recvmsg` sized to it, so the
//! descriptors always arrive with the prefix they belong to.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Most descriptors one message carries (the listeners).
pub(crate) const MAX_FDS: usize = 16;

/// Largest head accepted: a history snapshot is one head.
const MAX_HEAD: usize = 1 << 30;

/// Largest tail accepted: one connection's buffered bytes.
const MAX_TAIL: usize = 1 << 30;

const PREFIX: usize = 9;

/// One message received.
#[derive(Debug)]
pub(crate) struct Received {
    pub(crate) head: Vec<u8>,
    pub(crate) tail: Vec<u8>,
    pub(crate) fds: Vec<OwnedFd>,
}

/// Sends one message.
pub(crate) fn send(
    sock: &UnixStream,
    head: &[u8],
    tail: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if fds.len() > MAX_FDS || head.len() > MAX_HEAD || tail.len() > MAX_TAIL {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "handoff message too large",
        ));
    }
    let mut prefix = [0_u8; PREFIX];
    prefix[..4].copy_from_slice(&(head.len() as u32).to_le_bytes());
    prefix[4..8].copy_from_slice(&(tail.len() as u32).to_le_bytes());
    prefix[8] = fds.len() as u8;
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other(
            "descriptors do not fit the control buffer",
        ));
    }
    let mut sent = loop {
        match rustix::net::sendmsg(
            sock,
            &[IoSlice::new(&prefix)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    let mut w = sock;
    while sent < PREFIX {
        sent += w.write(&prefix[sent..])?;
    }
    w.write_all(head)?;
    w.write_all(tail)?;
    Ok(())
}

/// Receives one message; `UnexpectedEof` when the peer hung up.
pub(crate) fn recv(sock: &UnixStream) -> io::Result<Received> {
    let mut prefix = [0_u8; PREFIX];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = loop {
        match rustix::net::recvmsg(
            sock,
            &mut [IoSliceMut::new(&mut prefix)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(r) => break r.bytes,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = msg {
            fds.extend(received);
        }
    }
    if got == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut r = sock;
    r.read_exact(&mut prefix[got..])?;
    let head_len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    let tail_len = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]) as usize;
    if head_len > MAX_HEAD || tail_len > MAX_TAIL || fds.len() != usize::from(prefix[8]) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "bad handoff message: head {head_len} B, tail {tail_len} B, {} of {} descriptors",
                fds.len(),
                prefix[8]
            ),
        ));
    }
    let mut head = vec![0; head_len];
    r.read_exact(&mut head)?;
    let mut tail = vec![0; tail_len];
    r.read_exact(&mut tail)?;
    Ok(Received { head, tail, fds })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_message_carries_its_descriptors_and_bytes() {
        let (a, b) = UnixStream::pair().expect("test");
        let (x, mut y) = UnixStream::pair().expect("test");
        send(&a, b"{\"kind\":\"x\"}", b"tail", &[x.as_fd()]).expect("test");
        send(&a, b"second", &[], &[]).expect("test");
        let got = recv(&b).expect("test");
        assert_eq!(got.head, b"{\"kind\":\"x\"}");
        assert_eq!(got.tail, b"tail");
        assert_eq!(got.fds.len(), 1);
        // The descriptor received is the same socket: what is written on
        // it arrives at `x`'s peer.
        let mut passed = UnixStream::from(got.fds.into_iter().next().expect("test"));
        passed.write_all(b"through").expect("test");
        let mut buf = [0; 7];
        y.read_exact(&mut buf).expect("test");
        assert_eq!(&buf, b"through");
        let second = recv(&b).expect("test");
        assert_eq!(second.head, b"second");
        assert!(second.fds.is_empty());
        drop(a);
        assert_eq!(
            recv(&b).expect_err("an error").kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
