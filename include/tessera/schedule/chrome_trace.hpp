#pragma once
/// @file
/// chrome_trace: a Timeline as Chrome trace / Perfetto JSON (open in ui.perfetto.dev or
/// chrome://tracing).

#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "tessera/core/error.hpp"
#include "tessera/schedule/action.hpp"
#include "tessera/schedule/timeline.hpp"

namespace tessera::schedule {

/// The Trace Event Format document of `t`: {"traceEvents": [...], "displayTimeUnit": "ms"}.
/// Each event becomes a complete event (ph "X") with pid 0, tid = rank, ts and dur in
/// microseconds, name "F3" / "B3" / "I3" / "W3" / "SEND_F3" (kind and micro-batch), cat
/// "forward", "backward", "backward_input", "backward_weight" or "transfer", and args {microbatch, stage, chunk} (+ peer for transfers).
/// Metadata events (ph "M") name the process after t.title and each thread "rank r".
inline nlohmann::json chrome_trace(const Timeline& t) {
  using nlohmann::json;
  json events = json::array();
  events.push_back(json{{"name", "process_name"}, {"ph", "M"}, {"pid", 0}, {"tid", 0},
                        {"args", json{{"name", t.title.empty() ? std::string("pipeline") : t.title}}}});
  for (int r = 0; r < t.num_ranks; ++r) {
    events.push_back(json{{"name", "thread_name"}, {"ph", "M"}, {"pid", 0}, {"tid", r},
                          {"args", json{{"name", tessera::detail::str("rank ", r)}}}});
    events.push_back(json{{"name", "thread_sort_index"}, {"ph", "M"}, {"pid", 0}, {"tid", r},
                          {"args", json{{"sort_index", r}}}});
  }
  for (const TimelineEvent& e : t.events) {
    const Action& a = e.action;
    json args{{"microbatch", a.microbatch}, {"stage", a.stage_index}, {"chunk", e.chunk}};
    if (a.is_transfer()) args["peer"] = a.peer;
    const char* cat = a.kind == ActionKind::forward           ? "forward"
                      : a.kind == ActionKind::backward        ? "backward"
                      : a.kind == ActionKind::backward_input  ? "backward_input"
                      : a.kind == ActionKind::backward_weight ? "backward_weight"
                                                              : "transfer";
    events.push_back(json{{"name", short_name(a)}, {"cat", cat}, {"ph", "X"}, {"pid", 0}, {"tid", e.rank},
                          {"ts", e.start * 1e6}, {"dur", (e.end - e.start) * 1e6}, {"args", std::move(args)}});
  }
  return json{{"traceEvents", std::move(events)}, {"displayTimeUnit", "ms"}};
}

/// Writes chrome_trace(t) to the file `path`. Throws Error if the file cannot be written.
inline void write_chrome_trace(const Timeline& t, const std::string& path) {
  std::ofstream out(path);
  TESSERA_EXPECTS(out.good(), "write_chrome_trace: cannot open '", path, "' for writing");
  out << chrome_trace(t).dump(1) << "\n";
  TESSERA_EXPECTS(out.good(), "write_chrome_trace: writing '", path, "' failed");
}

}  // namespace tessera::schedule
