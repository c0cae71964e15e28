//! CRC32C (Castagnoli), the checksum of iSCSI digests and of IronSAN's blocks and frames.
//!
//! Backed by the `crc32c` crate, which uses SSE4.2/ARMv8 CRC instructions when present.
//! (`crc32fast` computes the IEEE polynomial, which is not what RFC 7143 or the data path use.)

/// CRC32C of `data`.
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Continues a CRC32C over more data, for checksums over scattered buffers.
#[inline]
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3720_vectors() {
        // RFC 3720 appendix B.4 test vectors.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&inc), 0x46dd_794e);
        assert_eq!(crc32c_append(crc32c(&inc[..10]), &inc[10..]), 0x46dd_794e);
    }
}
