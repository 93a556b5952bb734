//! The array's units: the block, the largest transfer and the most legs of one LU. A
//! leaf: every other module may use it, it uses none.

pub const BLOCK_SIZE: u32 = 512;
/// Largest transfer one command may ask for (32 MiB); more is ILLEGAL REQUEST, so a bad
/// CDB cannot make the array allocate without bound.
pub const MAX_TRANSFER_BLOCKS: u32 = 65536;

/// Most legs one LU can have: the LU and up to 15 mates (the config enforces it).
pub const MAX_LEGS: usize = 16;
