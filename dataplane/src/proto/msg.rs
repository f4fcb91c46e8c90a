//! Binary layouts of keys and bodies, per opcode. Every decoder checks lengths
//! before reading and never panics on input.

use super::Status;

/// A block's identity: which core and tier hold it, its slot, and a
/// generation that makes handles to freed-and-reused slots stale.
///
/// Wire form (u64, little-endian): bits 0..24 slot index, 24..48 generation,
/// 48..56 core, 56..64 tier. A slot whose generation would wrap is retired,
/// so a stale id never becomes valid again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u64);

impl BlockId {
    /// Highest slot index (2^24 slots per tier and core).
    pub const MAX_INDEX: u32 = (1 << 24) - 1;
    pub const MAX_GENERATION: u32 = (1 << 24) - 1;

    pub fn new(tier: u8, core: u8, generation: u32, index: u32) -> Self {
        debug_assert!(generation <= Self::MAX_GENERATION && index <= Self::MAX_INDEX);
        BlockId(
            ((tier as u64) << 56)
                | ((core as u64) << 48)
                | (((generation & Self::MAX_GENERATION) as u64) << 24)
                | (index & Self::MAX_INDEX) as u64,
        )
    }
    pub fn index(self) -> u32 {
        self.0 as u32 & Self::MAX_INDEX
    }
    pub fn generation(self) -> u32 {
        (self.0 >> 24) as u32 & Self::MAX_GENERATION
    }
    pub fn core(self) -> u8 {
        (self.0 >> 48) as u8
    }
    pub fn tier(self) -> u8 {
        (self.0 >> 56) as u8
    }
}

/// Tier numbers in `BlockId::tier`.
pub mod tier {
    pub const DRAM: u8 = 0;
    pub const FLASH: u8 = 1;
    pub const DISK: u8 = 2;
    /// Flag on `BlockAlloc`'s tier byte: when the named tier is full on the
    /// core, allocate on the next tier down that the node has (one step:
    /// DRAM → flash, or disk when there is no flash; flash → disk).
    pub const SPILL: u8 = 0x80;
    /// Bit `1 << t` of `NodeInfo::tiers` says the node has tier `t`.
    pub fn bit(t: u8) -> u8 {
        debug_assert!(t <= DISK);
        1 << t
    }
}

/// Reads little-endian integers from a byte slice, failing instead of panicking.
pub struct Reader<'a> {
    buf: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub &'static str);

impl From<DecodeError> for Status {
    fn from(_: DecodeError) -> Status {
        Status::Malformed
    }
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError(what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.bytes(1, what)?[0])
    }
    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        let b = self.bytes(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.bytes(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    pub fn end(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError(what))
        }
    }
}

/// Key of `BlockWrite`, `BlockAppend`, `BlockRead`, `BlockFree` (16 bytes):
/// block id u64, offset u32, length u32. `len == u32::MAX` on a read means
/// "to the end of the block's data"; write and append ignore offset/len as
/// documented per opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockKey {
    pub block: BlockId,
    pub offset: u32,
    pub len: u32,
}

impl BlockKey {
    pub const LEN: usize = 16;
    pub const TO_END: u32 = u32::MAX;

    pub fn encode(&self) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[0..8].copy_from_slice(&self.block.0.to_le_bytes());
        k[8..12].copy_from_slice(&self.offset.to_le_bytes());
        k[12..16].copy_from_slice(&self.len.to_le_bytes());
        k
    }

    pub fn decode(key: &[u8]) -> Result<Self, DecodeError> {
        if key.len() != Self::LEN {
            return Err(DecodeError("block key must be 16 bytes"));
        }
        let mut r = Reader::new(key);
        Ok(BlockKey { block: BlockId(r.u64("block")?), offset: r.u32("offset")?, len: r.u32("len")? })
    }
}

/// Pocket's job hints (`RegisterJob` body: empty, or exactly 32 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobHints {
    /// Placement: DRAM first, the rest on flash (Pocket's rule for
    /// latency-sensitive jobs); otherwise flash when the node has it.
    pub latency_sensitive: bool,
    /// When the job's tier is full, a block may go to the next tier down
    /// instead of the put failing with `no capacity`.
    #[serde(default)]
    pub spill_over: bool,
    /// Maximum concurrent workers (lambdas); 0 = unknown.
    pub max_workers: u32,
    /// Total capacity in bytes; 0 = unknown.
    pub capacity: u64,
    /// Peak throughput in bytes per second; 0 = unknown.
    pub peak_throughput: u64,
}

impl JobHints {
    pub const LEN: usize = 32;
    /// Bits of the first u32.
    const LATENCY_SENSITIVE: u32 = 1;
    const SPILL_OVER: u32 = 2;

    pub fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        let bits = (if self.latency_sensitive { Self::LATENCY_SENSITIVE } else { 0 })
            | (if self.spill_over { Self::SPILL_OVER } else { 0 });
        b[0..4].copy_from_slice(&bits.to_le_bytes());
        b[4..8].copy_from_slice(&self.max_workers.to_le_bytes());
        b[8..16].copy_from_slice(&self.capacity.to_le_bytes());
        b[16..24].copy_from_slice(&self.peak_throughput.to_le_bytes());
        b
    }

    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        if body.is_empty() {
            return Ok(JobHints::default());
        }
        if body.len() != Self::LEN {
            return Err(DecodeError("job hints must be empty or 32 bytes"));
        }
        let mut r = Reader::new(body);
        let bits = r.u32("hint flags")?;
        if bits & !(Self::LATENCY_SENSITIVE | Self::SPILL_OVER) != 0 {
            return Err(DecodeError("hint flags other than bits 0 and 1 must be zero"));
        }
        let h = JobHints {
            latency_sensitive: bits & Self::LATENCY_SENSITIVE != 0,
            spill_over: bits & Self::SPILL_OVER != 0,
            max_workers: r.u32("workers")?,
            capacity: r.u64("capacity")?,
            peak_throughput: r.u64("throughput")?,
        };
        if r.u64("reserved")? != 0 {
            return Err(DecodeError("reserved hint bytes must be zero"));
        }
        Ok(h)
    }
}

/// `JobInfo` response body: job id u32, hints (32 bytes, as in `RegisterJob`),
/// object count u64, bytes stored u64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobInfo {
    pub id: u32,
    pub hints: JobHints,
    pub objects: u64,
    pub bytes: u64,
}

impl JobInfo {
    pub const LEN: usize = 4 + JobHints::LEN + 16;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.hints.encode());
        out.extend_from_slice(&self.objects.to_le_bytes());
        out.extend_from_slice(&self.bytes.to_le_bytes());
    }

    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        if body.len() != Self::LEN {
            return Err(DecodeError("job info must be 52 bytes"));
        }
        let mut r = Reader::new(body);
        let id = r.u32("job id")?;
        let hints = JobHints::decode(r.bytes(JobHints::LEN, "hints")?)?;
        Ok(JobInfo { id, hints, objects: r.u64("objects")?, bytes: r.u64("bytes")? })
    }
}

/// Where a block lives: the storage node's number (`NodeInfo::node_number`)
/// and the block's id on that node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    pub node: u16,
    pub block: BlockId,
}

/// Most distinct nodes one location list (and so one object) may name: a
/// location refers to its node by a one-byte index into the list's table.
pub const MAX_NODES_PER_LIST: usize = 256;

/// Bytes of one encoded location (node index u8, block id u64).
pub const LOCATION_LEN: usize = 9;

/// Appends a location list: a table of *k* node numbers (u16 count, then
/// *k* × u16, each node once, in the order the locations first name them),
/// then *n* (u32) and *n* × (index into the table u8, block id u64).
/// At most `MAX_NODES_PER_LIST` distinct nodes: callers check
/// (`locations_len`) before building a longer list.
pub fn encode_locations(locs: &[Location], out: &mut Vec<u8>) {
    let mut table: Vec<u16> = Vec::new();
    let mut index = Vec::with_capacity(locs.len());
    for l in locs {
        let i = match table.iter().position(|&n| n == l.node) {
            Some(i) => i,
            None => {
                table.push(l.node);
                table.len() - 1
            }
        };
        debug_assert!(i < MAX_NODES_PER_LIST, "more than 256 nodes in one location list");
        index.push(i as u8);
    }
    out.extend_from_slice(&(table.len() as u16).to_le_bytes());
    for n in &table {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(&(locs.len() as u32).to_le_bytes());
    for (l, i) in locs.iter().zip(index) {
        out.push(i);
        out.extend_from_slice(&l.block.0.to_le_bytes());
    }
}

/// The most blocks an object may have on a node whose body limit is
/// `max_body`: its `PutObject` body (an ObjectMeta with a one-node table)
/// must fit.
pub fn max_blocks(max_body: usize) -> usize {
    max_body.saturating_sub(ObjectMeta::FIXED_LEN + 8) / LOCATION_LEN
}

/// The length of `locs` encoded as a location list (`encode_locations`),
/// or an error if it names too many distinct nodes to be encoded.
pub fn locations_len(locs: &[Location]) -> Result<usize, DecodeError> {
    let mut seen = std::collections::HashSet::new();
    for l in locs {
        seen.insert(l.node);
        if seen.len() > MAX_NODES_PER_LIST {
            return Err(DecodeError("an object's blocks may be on at most 256 nodes"));
        }
    }
    Ok(2 + 2 * seen.len() + 4 + LOCATION_LEN * locs.len())
}

/// Reads a location list (see `encode_locations`) that ends the input. The
/// table must list exactly the nodes the locations use, each once, in the
/// order they are first used (one encoding per list).
pub fn decode_locations(r: &mut Reader<'_>, max_blocks: usize) -> Result<Vec<Location>, DecodeError> {
    let k = r.u16("node count")? as usize;
    if k > MAX_NODES_PER_LIST || r.remaining() < k * 2 {
        return Err(DecodeError("node table larger than 256 entries or than the body"));
    }
    let mut table = Vec::with_capacity(k);
    for _ in 0..k {
        let n = r.u16("node number")?;
        if table.contains(&n) {
            return Err(DecodeError("a node number appears twice in the table"));
        }
        table.push(n);
    }
    let n = r.u32("block count")? as usize;
    if n > max_blocks || r.remaining() != n * LOCATION_LEN {
        return Err(DecodeError("block count does not match the body"));
    }
    let mut locs = Vec::with_capacity(n);
    let mut used = 0usize;
    for _ in 0..n {
        let i = r.u8("node index")? as usize;
        if i > used || i >= k {
            return Err(DecodeError("node index out of the table, or not in first-use order"));
        }
        if i == used {
            used += 1;
        }
        locs.push(Location { node: table[i], block: BlockId(r.u64("block")?) });
    }
    if used != k {
        return Err(DecodeError("the node table names a node no block is on"));
    }
    Ok(locs)
}

/// An object's metadata: `PutObject` request body and `Lookup` response body
/// (protocol version 2). Layout: size u64, flags u16, then a location list
/// (`encode_locations`): the object's blocks in object order, each on its
/// storage node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub size: u64,
    pub flags: u16,
    pub blocks: Vec<Location>,
}

impl ObjectMeta {
    /// Bytes before the location list.
    pub const FIXED_LEN: usize = 10;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        encode_locations(&self.blocks, out);
    }

    /// `max_blocks` bounds the allocation a hostile count could cause.
    pub fn decode(body: &[u8], max_blocks: usize) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let size = r.u64("size")?;
        let flags = r.u16("flags")?;
        let blocks = decode_locations(&mut r, max_blocks)?;
        Ok(ObjectMeta { size, flags, blocks })
    }

    /// Version 1's layout (size u64, flags u16, block count u32, then the
    /// block ids), read from a version 1 metadata log: every block is on
    /// node `node`.
    pub fn decode_v1(body: &[u8], node: u16) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let size = r.u64("size")?;
        let flags = r.u16("flags")?;
        let n = r.u32("block count")? as usize;
        if r.remaining() != n.saturating_mul(8) {
            return Err(DecodeError("block count does not match the body"));
        }
        let mut blocks = Vec::with_capacity(n);
        for _ in 0..n {
            blocks.push(Location { node, block: BlockId(r.u64("block")?) });
        }
        Ok(ObjectMeta { size, flags, blocks })
    }
}

/// One `Enumerate` entry. Body: count u32, then per entry kind u8
/// (0 = directory, 1 = object), size u64, flags u16, name length u16, name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DirEntry {
    pub name: String,
    pub is_dir: bool,
    pub size: u64,
    pub flags: u16,
}

/// Bytes of an encoded entry besides its name.
pub const ENTRY_FIXED_LEN: usize = 13;

pub fn encode_entries(entries: &[DirEntry], out: &mut Vec<u8>) {
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.push(if e.is_dir { 0 } else { 1 });
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&e.flags.to_le_bytes());
        out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        out.extend_from_slice(e.name.as_bytes());
    }
}

pub fn decode_entries(body: &[u8]) -> Result<Vec<DirEntry>, DecodeError> {
    let mut r = Reader::new(body);
    let n = r.u32("entry count")? as usize;
    // Each entry is at least 13 bytes: bound the allocation by the body.
    if n > r.remaining() / 13 {
        return Err(DecodeError("entry count larger than the body"));
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let kind = r.u8("kind")?;
        if kind > 1 {
            return Err(DecodeError("entry kind must be 0 or 1"));
        }
        let size = r.u64("size")?;
        let flags = r.u16("flags")?;
        let len = r.u16("name length")? as usize;
        let name =
            std::str::from_utf8(r.bytes(len, "name")?).map_err(|_| DecodeError("name is not UTF-8"))?;
        v.push(DirEntry { name: name.to_string(), is_dir: kind == 0, size, flags });
    }
    r.end("trailing bytes after entries")?;
    Ok(v)
}

/// `NodeInfo` response body: block size u32, max body u32, core count u16,
/// main port u16, node number u16, per core its own port u16, then the tier
/// bitmap u8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub block_size: u32,
    pub max_body: u32,
    pub main_port: u16,
    /// The node's number in its cluster: object locations name it.
    pub node_number: u16,
    pub core_ports: Vec<u16>,
    /// Bit `tier::bit(t)` set: the node has tier `t`. DRAM is always there.
    pub tiers: u8,
}

impl NodeInfo {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.max_body.to_le_bytes());
        out.extend_from_slice(&(self.core_ports.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.main_port.to_le_bytes());
        out.extend_from_slice(&self.node_number.to_le_bytes());
        for p in &self.core_ports {
            out.extend_from_slice(&p.to_le_bytes());
        }
        out.push(self.tiers);
    }

    /// Whether the node has tier `t`.
    pub fn has_tier(&self, t: u8) -> bool {
        t <= tier::DISK && self.tiers & tier::bit(t) != 0
    }

    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let block_size = r.u32("block size")?;
        let max_body = r.u32("max body")?;
        let n = r.u16("core count")? as usize;
        let main_port = r.u16("main port")?;
        let node_number = r.u16("node number")?;
        if n == 0 || r.remaining() != n * 2 + 1 {
            return Err(DecodeError("core count does not match the body"));
        }
        let mut core_ports = Vec::with_capacity(n);
        for _ in 0..n {
            core_ports.push(r.u16("core port")?);
        }
        let tiers = r.u8("tiers")?;
        if tiers & tier::bit(tier::DRAM) == 0 || tiers & !0b111 != 0 {
            return Err(DecodeError("tier bitmap must have bit 0 (DRAM) and no bit above 2"));
        }
        Ok(NodeInfo { block_size, max_body, main_port, node_number, core_ports, tiers })
    }
}

/// Splits a namespace key `job/path` into the job name and the path inside
/// the job (possibly empty, meaning the job's root directory).
pub fn split_job_key(key: &[u8]) -> Result<(&str, &str), DecodeError> {
    let s = std::str::from_utf8(key).map_err(|_| DecodeError("key is not UTF-8"))?;
    let (job, path) = match s.find('/') {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, ""),
    };
    if job.is_empty() {
        return Err(DecodeError("job name is empty"));
    }
    if job.chars().any(char::is_control) {
        return Err(DecodeError("job name has control characters"));
    }
    if job == "." || job == ".." {
        return Err(DecodeError("'.' and '..' are not job names"));
    }
    if !path.is_empty() && path.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") {
        return Err(DecodeError("path has an empty, '.' or '..' segment"));
    }
    if path.chars().any(char::is_control) {
        return Err(DecodeError("path has control characters"));
    }
    Ok((job, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn block_id_fields_round_trip(t: u8, c: u8, g in 0u32..=BlockId::MAX_GENERATION, i in 0u32..=BlockId::MAX_INDEX) {
            let b = BlockId::new(t, c, g, i);
            prop_assert_eq!((b.tier(), b.core(), b.generation(), b.index()), (t, c, g, i));
        }

        #[test]
        fn object_meta_round_trips(size: u64, flags: u16, blocks in prop::collection::vec((0u16..5, any::<u64>()), 0..50)) {
            let blocks = blocks.into_iter().map(|(node, b)| Location { node, block: BlockId(b) }).collect();
            let m = ObjectMeta { size, flags, blocks };
            let mut v = Vec::new();
            m.encode(&mut v);
            let nodes: std::collections::HashSet<u16> = m.blocks.iter().map(|l| l.node).collect();
            prop_assert_eq!(v.len(), ObjectMeta::FIXED_LEN + 2 + 2 * nodes.len() + 4 + LOCATION_LEN * m.blocks.len());
            prop_assert_eq!(ObjectMeta::decode(&v, 1000).unwrap(), m);
        }

        #[test]
        fn decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..80)) {
            let _ = ObjectMeta::decode(&bytes, 1000);
            let _ = ObjectMeta::decode_v1(&bytes, 3);
            let _ = decode_entries(&bytes);
            let _ = NodeInfo::decode(&bytes);
            let _ = JobHints::decode(&bytes);
            let _ = BlockKey::decode(&bytes);
            let _ = split_job_key(&bytes);
            let _ = JobInfo::decode(&bytes);
        }
    }

    #[test]
    fn entries_round_trip() {
        let e = vec![
            DirEntry { name: "a".into(), is_dir: true, size: 0, flags: 0 },
            DirEntry { name: "b.bin".into(), is_dir: false, size: 77, flags: 1 },
        ];
        let mut v = Vec::new();
        encode_entries(&e, &mut v);
        assert_eq!(decode_entries(&v).unwrap(), e);
    }

    #[test]
    fn object_meta_v2_layout_and_its_one_encoding() {
        let loc = |node, b| Location { node, block: BlockId(b) };
        let m = ObjectMeta { size: 9, flags: 1, blocks: vec![loc(7, 1), loc(3, 2), loc(7, 3)] };
        let mut v = Vec::new();
        m.encode(&mut v);
        let mut want = Vec::new();
        want.extend_from_slice(&9u64.to_le_bytes());
        want.extend_from_slice(&1u16.to_le_bytes());
        want.extend_from_slice(&[2, 0, 7, 0, 3, 0]); // k = 2: nodes 7, 3
        want.extend_from_slice(&3u32.to_le_bytes());
        for (i, b) in [(0u8, 1u64), (1, 2), (0, 3)] {
            want.push(i);
            want.extend_from_slice(&b.to_le_bytes());
        }
        assert_eq!(v, want);
        assert_eq!(ObjectMeta::decode(&v, 3).unwrap(), m);
        assert!(ObjectMeta::decode(&v, 2).is_err(), "more blocks than allowed");
        // Table order other than first use, an unused or repeated entry, an
        // index past the table: each has another encoding, so each is refused.
        let mut swapped = v.clone();
        swapped[12..16].copy_from_slice(&[3, 0, 7, 0]);
        swapped[20] = 1;
        swapped[29] = 0;
        swapped[38] = 1;
        assert!(ObjectMeta::decode(&swapped, 3).is_err());
        let mut unused = Vec::new();
        unused.extend_from_slice(&v[..10]);
        unused.extend_from_slice(&[1, 0, 7, 0, 0, 0, 0, 0]);
        assert!(ObjectMeta::decode(&unused, 3).is_err());
        let mut twice = v.clone();
        twice[14..16].copy_from_slice(&[7, 0]);
        assert!(ObjectMeta::decode(&twice, 3).is_err());
        let mut past = v.clone();
        past[38] = 2;
        assert!(ObjectMeta::decode(&past, 3).is_err());
        let empty = ObjectMeta { size: 0, flags: 0, blocks: vec![] };
        let mut e = Vec::new();
        empty.encode(&mut e);
        assert_eq!(e.len(), 16);
        assert_eq!(ObjectMeta::decode(&e, 0).unwrap(), empty);
        assert!(locations_len(&(0..257).map(|n| loc(n, 0)).collect::<Vec<_>>()).is_err());
        let locs: Vec<Location> = (0..256).chain(0..44).map(|n| loc(n, 0)).collect();
        let mut v = Vec::new();
        encode_locations(&locs, &mut v);
        assert_eq!(locations_len(&locs), Ok(v.len()));
    }

    #[test]
    fn object_meta_v1_reads_every_block_on_the_given_node() {
        let mut b = Vec::new();
        b.extend_from_slice(&70_000u64.to_le_bytes());
        b.extend_from_slice(&2u16.to_le_bytes());
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&5u64.to_le_bytes());
        b.extend_from_slice(&6u64.to_le_bytes());
        let m = ObjectMeta::decode_v1(&b, 4).unwrap();
        let at4 = |b| Location { node: 4, block: BlockId(b) };
        assert_eq!(m, ObjectMeta { size: 70_000, flags: 2, blocks: vec![at4(5), at4(6)] });
        assert!(ObjectMeta::decode_v1(&b[..b.len() - 1], 4).is_err());
    }

    #[test]
    fn hostile_counts_are_rejected_without_allocating() {
        let mut b = Vec::new();
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(ObjectMeta::decode(&b, 1 << 20).is_err());
        let mut v1 = vec![0u8; 10];
        v1.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(ObjectMeta::decode_v1(&v1, 0).is_err());
        assert!(decode_entries(&u32::MAX.to_le_bytes()).is_err());
    }

    #[test]
    fn job_keys() {
        assert_eq!(split_job_key(b"j/a/b").unwrap(), ("j", "a/b"));
        assert_eq!(split_job_key(b"j").unwrap(), ("j", ""));
        assert!(split_job_key(b"/a").is_err());
        assert!(split_job_key(b"j/a//b").is_err());
        assert!(split_job_key(b"j/../b").is_err());
        assert!(split_job_key(&[0xff]).is_err());
        assert!(split_job_key("j/a\u{85}b".as_bytes()).is_err(), "Unicode controls too");
        assert!(split_job_key(b"../x").is_err());
    }

    #[test]
    fn hints_round_trip_and_reject_bad() {
        let h = JobHints {
            latency_sensitive: true,
            spill_over: false,
            max_workers: 9,
            capacity: 1 << 30,
            peak_throughput: 5,
        };
        assert_eq!(JobHints::decode(&h.encode()).unwrap(), h);
        assert_eq!(JobHints::decode(&[]).unwrap(), JobHints::default());
        assert!(JobHints::decode(&[0; 31]).is_err());
        let mut b = h.encode();
        b[0] = 2;
        let spill = JobHints::decode(&b).unwrap();
        assert!(spill.spill_over && !spill.latency_sensitive, "bit 1 is spill_over");
        for bad in [4u8, 0x80] {
            b[0] = bad;
            assert!(JobHints::decode(&b).is_err(), "bit {bad:#x} must be zero");
        }
        b[0] = 0;
        b[3] = 1;
        assert!(JobHints::decode(&b).is_err(), "high bits of the flags word must be zero");
    }

    #[test]
    fn node_info_carries_tiers_and_is_strict() {
        let i = NodeInfo {
            block_size: 4096,
            max_body: 1 << 20,
            main_port: 7400,
            node_number: 513,
            core_ports: vec![7401, 7402],
            tiers: 0b011,
        };
        let mut v = Vec::new();
        i.encode(&mut v);
        assert_eq!(v.len(), 14 + 2 * 2 + 1);
        assert_eq!(v[12..14], [1, 2], "the node number follows the main port");
        let d = NodeInfo::decode(&v).unwrap();
        assert_eq!(d, i);
        assert!(d.has_tier(tier::FLASH) && !d.has_tier(tier::DISK) && !d.has_tier(9));
        assert!(NodeInfo::decode(&v[..v.len() - 1]).is_err(), "the tier byte is required");
        let mut long = v.clone();
        long.push(0);
        assert!(NodeInfo::decode(&long).is_err());
        for bad in [0b010u8, 0b1001] {
            *v.last_mut().unwrap() = bad;
            assert!(NodeInfo::decode(&v).is_err(), "tiers {bad:#b}");
        }
    }
}
