//! A connection's outgoing bytes with storage read buffers spliced in, so a
//! block read from flash reaches the socket from the registered buffer the
//! device wrote it to: a gathering send (`sendmsg`/`writev`) takes the
//! response header from the byte stream and the data from the buffer, with
//! no copy in between.

use crate::storage::ReadBuf;

/// Bytes, with `ReadBuf`s spliced in at byte offsets. The logical stream is
/// `bytes[..a0]`, `buf0`, `bytes[a0..a1]`, `buf1`, …, `bytes[ak..]`.
#[derive(Default)]
pub struct Output {
    bytes: Vec<u8>,
    /// `(at, buf)`: `buf`'s bytes come right before `bytes[at..]`. `at`
    /// never decreases along the list.
    bufs: Vec<(usize, ReadBuf)>,
    /// Sum of the spliced buffers' lengths.
    buf_len: usize,
}

impl Output {
    pub fn new() -> Output {
        Output::default()
    }

    /// The byte stream, to append to (appending keeps every splice where it
    /// is; do not remove bytes through it).
    pub fn bytes_mut(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }

    /// Appends `buf`'s bytes to the stream, holding the buffer until the
    /// output is cleared.
    pub fn push_buf(&mut self, buf: ReadBuf) {
        if buf.is_empty() {
            return;
        }
        self.buf_len += buf.len();
        self.bufs.push((self.bytes.len(), buf));
    }

    pub fn len(&self) -> usize {
        self.bytes.len() + self.buf_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether any read buffer is spliced in.
    pub fn has_bufs(&self) -> bool {
        !self.bufs.is_empty()
    }

    /// Empties the output, returning its buffers to their pools.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.bufs.clear();
        self.buf_len = 0;
    }

    /// Moves `other`'s stream to the end of this one and leaves `other`
    /// empty: into an empty output by swapping (no copy, and `other` gets
    /// this one's spare capacity), otherwise by copying `other`'s bytes (its
    /// buffers move, they are never copied).
    pub fn append(&mut self, other: &mut Output) {
        if self.is_empty() {
            self.clear();
            std::mem::swap(self, other);
            return;
        }
        let base = self.bytes.len();
        self.bytes.extend_from_slice(&other.bytes);
        self.buf_len += other.buf_len;
        self.bufs.extend(other.bufs.drain(..).map(|(at, b)| (base + at, b)));
        other.clear();
    }

    /// Appends raw bytes (copied), for backends handed a plain `Vec`.
    pub fn append_bytes(&mut self, bytes: &mut Vec<u8>) {
        if self.is_empty() {
            self.bytes.clear();
            std::mem::swap(&mut self.bytes, bytes);
        } else {
            self.bytes.extend_from_slice(bytes);
            bytes.clear();
        }
    }

    /// Calls `f` with the stream's pieces from byte `off` on, in order, at
    /// most `max_pieces` of them and no more than `max_bytes` in all (the
    /// last piece is cut short if need be). Returns the bytes covered.
    pub fn gather<'a>(
        &'a self,
        off: usize,
        max_bytes: usize,
        max_pieces: usize,
        mut f: impl FnMut(&'a [u8]),
    ) -> usize {
        let mut pos = 0; // logical position of the next piece
        let mut done = 0;
        let mut pieces = 0;
        let mut from = 0; // next unvisited index into `bytes`
        let mut put = |piece: &'a [u8], pos: &mut usize| -> bool {
            let end = *pos + piece.len();
            if end > off.max(*pos) && pieces < max_pieces && done < max_bytes {
                let skip = off.saturating_sub(*pos);
                let take = (piece.len() - skip).min(max_bytes - done);
                f(&piece[skip..skip + take]);
                done += take;
                pieces += 1;
            }
            *pos = end;
            pieces < max_pieces && done < max_bytes
        };
        for (at, buf) in &self.bufs {
            if !put(&self.bytes[from..*at], &mut pos) || !put(buf.bytes(), &mut pos) {
                return done;
            }
            from = *at;
        }
        put(&self.bytes[from..], &mut pos);
        done
    }

    /// Copies the spliced buffers into the byte stream (releasing them) and
    /// returns it, for backends that cannot gather.
    pub fn flatten(&mut self) -> &mut Vec<u8> {
        if !self.bufs.is_empty() {
            let mut flat = Vec::with_capacity(self.len());
            let mut from = 0;
            for (at, buf) in self.bufs.drain(..) {
                flat.extend_from_slice(&self.bytes[from..at]);
                flat.extend_from_slice(buf.bytes());
                from = at;
            }
            flat.extend_from_slice(&self.bytes[from..]);
            self.bytes = flat;
            self.buf_len = 0;
        }
        &mut self.bytes
    }
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Output").field("bytes", &self.bytes.len()).field("bufs", &self.bufs.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::storage::flash::testing;

    #[derive(Debug, Clone)]
    enum Op {
        Bytes(Vec<u8>),
        Buf(Vec<u8>),
        /// Append another output made of these pieces (true: a buffer).
        Append(Vec<(bool, Vec<u8>)>),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        let data = || proptest::collection::vec(any::<u8>(), 0..64);
        prop_oneof![
            4 => data().prop_map(Op::Bytes),
            4 => data().prop_map(Op::Buf),
            2 => proptest::collection::vec((any::<bool>(), data()), 0..4).prop_map(Op::Append),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        /// Whatever is appended, the stream is the concatenation (as
        /// `flatten` and every `gather` window see it), and every buffer
        /// goes back to its pool once the output is cleared.
        #[test]
        fn stream_is_the_concatenation(
            ops in proptest::collection::vec(op(), 0..24),
            off in 0usize..2048,
            max_bytes in 1usize..2048,
            max_pieces in 1usize..8,
        ) {
            let pool = testing::pool(128);
            let mut out = Output::new();
            let mut model = Vec::new();
            for op in ops {
                match op {
                    Op::Bytes(mut b) => {
                        model.extend_from_slice(&b);
                        if out.is_empty() {
                            out.append_bytes(&mut b);
                        } else {
                            out.bytes_mut().append(&mut b);
                        }
                    }
                    Op::Buf(b) => {
                        model.extend_from_slice(&b);
                        out.push_buf(testing::read_buf(&pool, &b).unwrap());
                    }
                    Op::Append(pieces) => {
                        let mut other = Output::new();
                        for (buf, b) in pieces {
                            model.extend_from_slice(&b);
                            if buf {
                                other.push_buf(testing::read_buf(&pool, &b).unwrap());
                            } else {
                                other.bytes_mut().extend_from_slice(&b);
                            }
                        }
                        out.append(&mut other);
                        prop_assert!(other.is_empty());
                    }
                    Op::Clear => {
                        out.clear();
                        model.clear();
                    }
                }
                prop_assert_eq!(out.len(), model.len());
            }
            // Every window the senders could ask for.
            let mut got = Vec::new();
            let mut pieces = 0;
            let done = out.gather(off, max_bytes, max_pieces, |p| {
                assert!(!p.is_empty());
                got.extend_from_slice(p);
                pieces += 1;
            });
            prop_assert_eq!(done, got.len());
            prop_assert!(pieces <= max_pieces);
            let start = off.min(model.len());
            let end = (start + max_bytes).min(model.len());
            prop_assert_eq!(&got[..], &model[start..start + got.len()]);
            if pieces < max_pieces {
                prop_assert_eq!(start + got.len(), end);
            }
            // Sending the rest piece by piece covers the stream exactly.
            let mut all = Vec::new();
            while all.len() < out.len() {
                let at = all.len();
                let n = out.gather(at, usize::MAX, 1, |p| all.extend_from_slice(p));
                prop_assert!(n > 0);
            }
            prop_assert_eq!(&all, &model);
            prop_assert_eq!(out.flatten().clone(), model);
            prop_assert!(!out.has_bufs());
            drop(out);
            prop_assert_eq!(pool.available(), 128);
        }
    }
}
