#pragma once
/// @file
/// make_comm_hook: a built-in CommHook from its command-line name ("none", "bf16", "fp16",
/// "powersgd:R", "topk:F"), as train_gpt's --compress takes it.

#include <concepts>
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "tessera/core/error.hpp"
#include "tessera/parallel/data/compression/all_reduce_hook.hpp"
#include "tessera/parallel/data/compression/comm_hook.hpp"
#include "tessera/parallel/data/compression/half_precision_hook.hpp"
#include "tessera/parallel/data/compression/power_sgd_hook.hpp"
#include "tessera/parallel/data/compression/top_k_hook.hpp"

namespace tessera {

/// The hook named by `spec`: "none" (AllReduceHook), "bf16" / "fp16" (HalfPrecisionHook),
/// "powersgd:R" (PowerSGDHook of rank R >= 1), "topk:F" (TopKHook sending the fraction
/// 0 < F <= 1). PowerSGD and top-k take an option after a comma: "powersgd:4,warmup=40"
/// all-reduces each bucket uncompressed for its first 40 reductions (PowerSGDOptions::
/// warmup_steps, PyTorch's start_powerSGD_iter; TopKHook's warmup_steps the same). Throws tessera::Error naming the spec and the accepted forms
/// otherwise. Local.
template <std::floating_point T>
std::shared_ptr<CommHook<T>> make_comm_hook(const std::string& spec) {
  const std::string forms =
      "expected none, bf16, fp16, powersgd:R[,warmup=N] (R an integer >= 1, N >= 0) or topk:F[,warmup=N] (0 < F <= 1)";
  const std::size_t comma = spec.find(',');
  const std::string head = spec.substr(0, comma);
  const std::string options = comma == std::string::npos ? "" : spec.substr(comma + 1);
  // An integer option's value: decimal digits only (no sign, no spaces).
  const auto integer = [](const std::string& text, long& value) {
    if (text.empty() || text.size() > 12 || !std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; }))
      return false;
    value = std::stol(text);
    return true;
  };
  TESSERA_EXPECTS(comma == std::string::npos || !options.empty(), "compression \"", spec,
                  "\": an empty option after the comma; ", forms);
  TESSERA_EXPECTS(options.empty() || head.rfind("powersgd:", 0) == 0 || head.rfind("topk:", 0) == 0, "compression \"",
                  spec, "\": only powersgd and topk take options after a comma; ", forms);
  // The warm-up option (warmup=N), the only one; its value, 0 when absent.
  const auto warmup = [&]() {
    long w = 0;
    bool seen = false;
    for (std::size_t at = 0; at <= options.size() && !options.empty();) {
      const std::size_t end = std::min(options.find(',', at), options.size());
      const std::string item = options.substr(at, end - at);
      at = end + 1;
      TESSERA_EXPECTS(!item.empty(), "compression \"", spec, "\": an empty option (a stray comma); ", forms);
      const std::size_t eq = item.find('=');
      const std::string key = item.substr(0, eq), value = eq == std::string::npos ? "" : item.substr(eq + 1);
      TESSERA_EXPECTS(key == "warmup", "compression \"", spec, "\": option \"", item, "\" is unknown; ", forms);
      TESSERA_EXPECTS(!seen, "compression \"", spec, "\": warmup is given twice; ", forms);
      seen = true;
      TESSERA_EXPECTS(integer(value, w) && w >= 0, "compression \"", spec, "\": warmup \"", value,
                      "\" is not an integer >= 0; ", forms);
    }
    return static_cast<std::int64_t>(w);
  };
  if (head == "none") return std::make_shared<AllReduceHook<T>>();
  if (head == "bf16") return std::make_shared<HalfPrecisionHook<T>>(HalfFormat::bf16);
  if (head == "fp16") return std::make_shared<HalfPrecisionHook<T>>(HalfFormat::fp16);
  const std::size_t colon = head.find(':');
  const std::string kind = head.substr(0, colon), arg = colon == std::string::npos ? "" : head.substr(colon + 1);
  if (kind == "powersgd" && !arg.empty()) {
    long r = 0;
    TESSERA_EXPECTS(integer(arg, r) && r >= 1 && r <= 1 << 20, "compression \"", spec, "\": rank \"", arg,
                    "\" is not an integer >= 1; ", forms);
    return std::make_shared<PowerSGDHook<T>>(PowerSGDOptions{.rank = static_cast<int>(r), .warmup_steps = warmup()});
  }
  if (kind == "topk" && !arg.empty()) {
    double f = 0;
    std::size_t used = 0;
    try {  // a plain decimal number: no sign and no spaces (std::stod would skip them)
      if ((arg[0] >= '0' && arg[0] <= '9') || arg[0] == '.') f = std::stod(arg, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    TESSERA_EXPECTS(used == arg.size() && f > 0 && f <= 1, "compression \"", spec, "\": fraction \"", arg,
                    "\" is not in (0, 1]; ", forms);
    return std::make_shared<TopKHook<T>>(f, warmup());
  }
  throw Error(detail::str("compression \"", spec, "\" is unknown; ", forms));
}

}  // namespace tessera
