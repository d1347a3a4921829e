#pragma once
/// @file
/// make_comm_hook: a built-in CommHook from its command-line name ("none", "bf16", "fp16",
/// "powersgd:R", "topk:F"), as train_gpt's --compress takes it.

#include <concepts>
#include <cstddef>
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
/// 0 < F <= 1). Throws tessera::Error naming the spec and the accepted forms otherwise. Local.
template <std::floating_point T>
std::shared_ptr<CommHook<T>> make_comm_hook(const std::string& spec) {
  const std::string forms = "expected none, bf16, fp16, powersgd:R (R an integer >= 1) or topk:F (0 < F <= 1)";
  if (spec == "none") return std::make_shared<AllReduceHook<T>>();
  if (spec == "bf16") return std::make_shared<HalfPrecisionHook<T>>(HalfFormat::bf16);
  if (spec == "fp16") return std::make_shared<HalfPrecisionHook<T>>(HalfFormat::fp16);
  const std::size_t colon = spec.find(':');
  const std::string kind = spec.substr(0, colon), arg = colon == std::string::npos ? "" : spec.substr(colon + 1);
  std::size_t used = 0;
  if (kind == "powersgd" && !arg.empty()) {
    long r = 0;
    try {
      r = std::stol(arg, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    TESSERA_EXPECTS(used == arg.size() && r >= 1 && r <= 1 << 20, "compression \"", spec, "\": rank \"", arg,
                    "\" is not an integer >= 1; ", forms);
    return std::make_shared<PowerSGDHook<T>>(PowerSGDOptions{.rank = static_cast<int>(r)});
  }
  if (kind == "topk" && !arg.empty()) {
    double f = 0;
    try {
      f = std::stod(arg, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    TESSERA_EXPECTS(used == arg.size() && f > 0 && f <= 1, "compression \"", spec, "\": fraction \"", arg,
                    "\" is not in (0, 1]; ", forms);
    return std::make_shared<TopKHook<T>>(f);
  }
  throw Error(detail::str("compression \"", spec, "\" is unknown; ", forms));
}

}  // namespace tessera
