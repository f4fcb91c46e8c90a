//! One buffered, pipelined connection to one core.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::ClientError;
use crate::proto::{decode_header, encode_header, Header, Limits, Opcode, Status, HEADER_LEN};

/// Largest response body a client accepts (enumerations of big directories).
const MAX_RESPONSE_BODY: usize = 256 << 20;

pub struct Response {
    pub id: u64,
    pub flags: u16,
    pub status: Status,
    pub body: Vec<u8>,
}

pub struct Conn {
    addr: SocketAddr,
    rd: BufReader<TcpStream>,
    wr: BufWriter<TcpStream>,
    next_id: u64,
    max_body: usize,
    /// The node marked a reply CLOSING: this connection is finished.
    closing: bool,
}

impl Conn {
    pub fn new(stream: TcpStream, addr: SocketAddr, timeout: Duration) -> Result<Conn, ClientError> {
        let io = |source| ClientError::Io { addr, source };
        stream.set_nodelay(true).map_err(io)?;
        let w = stream.try_clone().map_err(io)?;
        let mut c = Conn {
            addr,
            rd: BufReader::with_capacity(256 << 10, stream),
            wr: BufWriter::with_capacity(256 << 10, w),
            next_id: 1,
            max_body: u32::MAX as usize,
            closing: false,
        };
        c.set_timeout(timeout);
        Ok(c)
    }

    /// The node's body limit: larger requests fail here instead of closing the connection.
    pub fn set_max_body(&mut self, max: usize) {
        self.max_body = max;
    }

    pub fn closing(&self) -> bool {
        self.closing
    }

    pub fn set_timeout(&mut self, t: Duration) {
        let _ = self.rd.get_ref().set_read_timeout(Some(t));
        let _ = self.wr.get_ref().set_write_timeout(Some(t));
    }

    fn io(&self) -> impl Fn(std::io::Error) -> ClientError + '_ {
        move |source| ClientError::Io { addr: self.addr, source }
    }

    /// Buffers a request; returns its id. Call `flush` to send.
    pub fn send(&mut self, op: Opcode, flags: u16, key: &[u8], body: &[u8]) -> Result<u64, ClientError> {
        if key.len() > crate::proto::MAX_KEY_LEN {
            let max = crate::proto::MAX_KEY_LEN;
            return Err(ClientError::Local(format!("key of {} bytes exceeds {max}", key.len())));
        }
        if body.len() > self.max_body {
            return Err(ClientError::Status {
                status: Status::TooLarge,
                message: format!(
                    "body of {} bytes exceeds the node's limit of {}",
                    body.len(),
                    self.max_body
                ),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut h = [0u8; HEADER_LEN];
        encode_header(&Header::request(op, flags, id, key.len(), body.len()), &mut h);
        let addr = self.addr;
        let io = |source| ClientError::Io { addr, source };
        self.wr.write_all(&h).map_err(io)?;
        self.wr.write_all(key).map_err(io)?;
        self.wr.write_all(body).map_err(io)?;
        Ok(id)
    }

    pub fn flush(&mut self) -> Result<(), ClientError> {
        let addr = self.addr;
        self.wr.flush().map_err(|source| ClientError::Io { addr, source })
    }

    /// The next response on this connection, whatever its id.
    pub fn recv(&mut self) -> Result<Response, ClientError> {
        let mut h = [0u8; HEADER_LEN];
        self.rd.read_exact(&mut h).map_err(self.io())?;
        let limits = Limits { max_key: crate::proto::MAX_KEY_LEN, max_body: MAX_RESPONSE_BODY };
        let hdr = decode_header(&h, &limits, false)
            .map_err(|e| ClientError::Protocol(format!("bad response header: {e}")))?
            .ok_or_else(|| ClientError::Protocol("short header".into()))?;
        let status =
            hdr.status().ok_or_else(|| ClientError::Protocol(format!("unknown status {}", hdr.status)))?;
        self.closing |= hdr.flags & crate::proto::flags::CLOSING != 0;
        let mut key = vec![0u8; hdr.key_len as usize];
        self.rd.read_exact(&mut key).map_err(self.io())?;
        let mut body = vec![0u8; hdr.body_len as usize];
        self.rd.read_exact(&mut body).map_err(self.io())?;
        Ok(Response { id: hdr.request_id, flags: hdr.flags, status, body })
    }

    /// The response to request `id`, which must be the next one.
    pub fn expect(&mut self, id: u64) -> Result<Response, ClientError> {
        let r = self.recv()?;
        if r.id != id {
            return Err(ClientError::Protocol(format!("expected response {id}, got {}", r.id)));
        }
        Ok(r)
    }
}
