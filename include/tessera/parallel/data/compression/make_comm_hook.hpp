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
/// 0 < F <= 1). PowerSGD and top-k take options after commas: "powersgd:4,warmup=40"
/// all-reduces each bucket uncompressed for its first 40 reductions (PowerSGDOptions::
/// warmup_steps, PyTorch's start_powerSGD_iter; TopKHook's warmup_steps the same);
/// "topk:0.01,momentum=0.9" is DGC's momentum correction (TopKHook's momentum, 0 <= M < 1);
/// "topk:0.01,sparsity_warmup=40" is DGC's sparsity warm-up over the first 40 compressed
/// reductions (TopKHook's sparsity_warmup_steps, S >= 0).
/// Throws tessera::Error naming the spec and the accepted forms otherwise. Local.
template <std::floating_point T>
std::shared_ptr<CommHook<T>> make_comm_hook(const std::string& spec) {
  const std::string forms =
      "expected none, bf16, fp16, powersgd:R[,warmup=N] (R an integer in [1, 1048576], N >= 0) or "
      "topk:F[,warmup=N][,momentum=M][,sparsity_warmup=S] (0 < F <= 1, 0 <= M < 1, S >= 0)";
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
  // A plain decimal number: no sign and no spaces (std::stod would skip them).
  const auto decimal = [](const std::string& text, double& value) {
    std::size_t used = 0;
    try {
      if (!text.empty() && ((text[0] >= '0' && text[0] <= '9') || text[0] == '.')) value = std::stod(text, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    return used > 0 && used == text.size();
  };
  // The options after the head: warmup=N (both), momentum=M and sparsity_warmup=S (top-k
  // only); each at most once.
  struct Options {
    std::int64_t warmup = 0;
    double momentum = 0;
    std::int64_t sparsity_warmup = 0;
  };
  const auto parse_options = [&](bool top_k) {
    Options o;
    bool seen_warmup = false, seen_momentum = false, seen_sparsity_warmup = false;
    for (std::size_t at = 0; at <= options.size() && !options.empty();) {
      const std::size_t end = std::min(options.find(',', at), options.size());
      const std::string item = options.substr(at, end - at);
      at = end + 1;
      TESSERA_EXPECTS(!item.empty(), "compression \"", spec, "\": an empty option (a stray comma); ", forms);
      const std::size_t eq = item.find('=');
      const std::string key = item.substr(0, eq), value = eq == std::string::npos ? "" : item.substr(eq + 1);
      // A count option (warmup=N, sparsity_warmup=S): an integer >= 0, given at most once.
      const auto count = [&](bool& seen, std::int64_t& out) {
        TESSERA_EXPECTS(!seen, "compression \"", spec, "\": ", key, " is given twice; ", forms);
        seen = true;
        long w = 0;
        TESSERA_EXPECTS(integer(value, w) && w >= 0, "compression \"", spec, "\": ", key, " \"", value,
                        "\" is not an integer >= 0; ", forms);
        out = w;
      };
      if (key == "warmup") {
        count(seen_warmup, o.warmup);
      } else if (key == "sparsity_warmup" && top_k) {
        count(seen_sparsity_warmup, o.sparsity_warmup);
      } else if (key == "momentum" && top_k) {
        TESSERA_EXPECTS(!seen_momentum, "compression \"", spec, "\": momentum is given twice; ", forms);
        seen_momentum = true;
        TESSERA_EXPECTS(decimal(value, o.momentum) && static_cast<T>(o.momentum) < 1, "compression \"", spec, "\": momentum \"", value,
                        "\" is not in [0, 1); ", forms);
      } else {
        throw Error(detail::str("compression \"", spec, "\": option \"", item, "\" is unknown; ", forms));
      }
    }
    return o;
  };
  if (head == "none") return std::make_shared<AllReduceHook<T>>();
  if (head == "bf16") return std::make_shared<HalfPrecisionHook<T>>(HalfFormat::bf16);
  if (head == "fp16") return std::make_shared<HalfPrecisionHook<T>>(HalfFormat::fp16);
  const std::size_t colon = head.find(':');
  const std::string kind = head.substr(0, colon), arg = colon == std::string::npos ? "" : head.substr(colon + 1);
  if (kind == "powersgd" && !arg.empty()) {
    long r = 0;
    TESSERA_EXPECTS(integer(arg, r) && r >= 1 && r <= 1 << 20, "compression \"", spec, "\": rank \"", arg,
                    "\" is not an integer in [1, 1048576]; ", forms);
    return std::make_shared<PowerSGDHook<T>>(
        PowerSGDOptions{.rank = static_cast<int>(r), .warmup_steps = parse_options(false).warmup});
  }
  if (kind == "topk" && !arg.empty()) {
    double f = 0;
    TESSERA_EXPECTS(decimal(arg, f) && f > 0 && f <= 1, "compression \"", spec, "\": fraction \"", arg,
                    "\" is not in (0, 1]; ", forms);
    const Options o = parse_options(true);
    return std::make_shared<TopKHook<T>>(f, o.warmup, o.momentum, o.sparsity_warmup);
  }
  throw Error(detail::str("compression \"", spec, "\" is unknown; ", forms));
}

}  // namespace tessera
