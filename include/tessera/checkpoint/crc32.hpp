#pragma once
/// @file
/// crc32: the CRC-32 checksum of zlib, PNG and gzip, which tessera stores for every tensor it
/// writes, so a corrupted byte in a checkpoint is an error naming the tensor, not a silent load.

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

namespace tessera::checkpoint {

namespace detail {
/// The 8 lookup tables of slicing-by-8 (Kounavis and Berry, "A systematic approach to building
/// high performance software-based CRC generators", ISCC 2005) for the reflected polynomial
/// 0xEDB88320.
inline constexpr std::array<std::array<std::uint32_t, 256>, 8> crc32_tables = [] {
  std::array<std::array<std::uint32_t, 256>, 8> t{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1U) ? 0xEDB88320U ^ (c >> 1) : c >> 1;
    t[0][i] = c;
  }
  for (std::size_t s = 1; s < 8; ++s)
    for (std::size_t i = 0; i < 256; ++i) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFFU];
  return t;
}();
}  // namespace detail

/// The CRC-32 of `bytes` continued from `crc` (0 to start), equal to Python's
/// `zlib.crc32(bytes, crc)`: crc32(b"123456789") == 0xCBF43926. About 1-2 GB/s on one core.
inline std::uint32_t crc32(std::span<const std::byte> bytes, std::uint32_t crc = 0) noexcept {
  const auto& t = detail::crc32_tables;
  std::uint32_t c = ~crc;
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  std::size_t n = bytes.size();
  while (n >= 8) {
    std::uint32_t lo = 0, hi = 0;
    std::memcpy(&lo, p, 4);  // little-endian hosts only (safetensors is little-endian)
    std::memcpy(&hi, p + 4, 4);
    lo ^= c;
    c = t[7][lo & 0xFFU] ^ t[6][(lo >> 8) & 0xFFU] ^ t[5][(lo >> 16) & 0xFFU] ^ t[4][lo >> 24] ^
        t[3][hi & 0xFFU] ^ t[2][(hi >> 8) & 0xFFU] ^ t[1][(hi >> 16) & 0xFFU] ^ t[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) c = t[0][(c ^ *p++) & 0xFFU] ^ (c >> 8);
  return ~c;
}

}  // namespace tessera::checkpoint
