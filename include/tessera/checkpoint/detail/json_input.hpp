#pragma once
/// @file
/// Reading JSON that comes from a file (a safetensors header, a checkpoint's index.json, a
/// Hugging Face weight map) without trusting it: parsing with a nesting limit, integers read
/// with their type and range checked, and values shown in errors cut to a readable length.

#include <nlohmann/json.hpp>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>

#include "tessera/core/error.hpp"

namespace tessera::checkpoint::detail {

/// The deepest nesting of arrays and objects accepted in a file's JSON. tessera's own files
/// nest at most 8 levels (index.json: tensors / name / pieces / piece / geometry / ranges /
/// range); a user's config or extra may nest more. The limit exists because nlohmann-json's
/// dump, copy and comparison recurse once per level: a header of a million '[' would
/// overflow the stack.
inline constexpr int max_json_depth = 128;

/// Parses `text` as JSON of type `Json` (nlohmann::json or nlohmann::ordered_json). Throws
/// tessera::Error "<what> is not valid JSON: ..." for a syntax error, and "<what> nests
/// deeper than 128 levels" beyond max_json_depth (checked while parsing, before any
/// recursion).
template <class Json>
Json parse_json(std::string_view text, std::string_view what) {
  const typename Json::parser_callback_t limit = [&](int depth, nlohmann::json::parse_event_t event, Json&) {
    if ((event == nlohmann::json::parse_event_t::object_start || event == nlohmann::json::parse_event_t::array_start) &&
        depth >= max_json_depth)
      throw Error(tessera::detail::str(what, " nests deeper than ", max_json_depth, " levels"));
    return true;
  };
  try {
    return Json::parse(text.begin(), text.end(), limit);
  } catch (const nlohmann::json::exception& e) {
    throw Error(tessera::detail::str(what, " is not valid JSON: ", e.what()));
  }
}

/// `j` as compact JSON text, cut to at most `max_chars` characters (then ending in "...").
/// For error messages: a value from a file may be megabytes long.
template <class Json>
std::string brief(const Json& j, std::size_t max_chars = 80) {
  std::string s = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (s.size() > max_chars) s = s.substr(0, max_chars) + "...";
  return s;
}

/// The integer `v` as an I in [lo, hi]. Throws tessera::Error "<what> is <value>, not an
/// integer in [lo, hi]" when `v` is not a JSON integer (a float such as 1e300 converted
/// would be undefined behaviour; 2.0 is refused too) or lies outside the range.
template <std::integral I, class Json>
I integer(const Json& v, std::string_view what, I lo = std::numeric_limits<I>::min(),
          I hi = std::numeric_limits<I>::max()) {
  bool ok = false;
  I out{};
  if (v.is_number_unsigned()) {
    const auto u = v.template get<std::uint64_t>();
    ok = hi >= 0 && u <= static_cast<std::uint64_t>(hi) && (lo <= 0 || u >= static_cast<std::uint64_t>(lo));
    out = static_cast<I>(u);
  } else if (v.is_number_integer()) {
    const auto s = v.template get<std::int64_t>();
    if constexpr (std::signed_integral<I>) {
      ok = s >= static_cast<std::int64_t>(lo) && s <= static_cast<std::int64_t>(hi);
    } else {
      ok = s >= 0 && static_cast<std::uint64_t>(s) >= lo && static_cast<std::uint64_t>(s) <= hi;
    }
    out = static_cast<I>(s);
  }
  if (!ok)
    throw Error(tessera::detail::str(what, " is ", brief(v), ", not an integer in [", +lo, ", ", +hi, "]"));
  return out;
}

/// The string `v`. Throws tessera::Error "<what> is <value>, not a string" otherwise.
template <class Json>
std::string string_of(const Json& v, std::string_view what) {
  if (!v.is_string()) throw Error(tessera::detail::str(what, " is ", brief(v), ", not a string"));
  return v.template get<std::string>();
}

/// The member `key` of the object `j`. Throws tessera::Error "<what> has no \"key\"" when
/// `j` is no object or lacks it.
template <class Json>
const Json& member(const Json& j, std::string_view key, std::string_view what) {
  if (!j.is_object()) throw Error(tessera::detail::str(what, " is ", brief(j), ", not a JSON object"));
  const auto it = j.find(std::string(key));
  if (it == j.end()) throw Error(tessera::detail::str(what, " has no \"", key, "\""));
  return *it;
}

/// The product of `extents` when it and its product times `bytes_per_element` fit in
/// int64 (every extent non-negative); otherwise -1. A zero extent makes the product 0
/// whatever the others are.
inline std::int64_t checked_numel(const auto& extents, std::int64_t bytes_per_element = 1) {
  constexpr std::int64_t max = std::numeric_limits<std::int64_t>::max();
  bool zero = false;
  for (std::int64_t d : extents) {
    if (d < 0) return -1;
    zero = zero || d == 0;
  }
  if (zero) return 0;
  std::int64_t n = 1;
  for (std::int64_t d : extents) {
    if (n > max / d) return -1;
    n *= d;
  }
  return n > max / bytes_per_element ? -1 : n;
}

}  // namespace tessera::checkpoint::detail
