#pragma once
/// @file
/// to_svg: a Timeline drawn as a standalone SVG picture -- ranks as rows, each F and B a
/// labelled box, a time axis and a title -- for docs and talks.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <fstream>
#include <string>

#include "tessera/core/error.hpp"
#include "tessera/schedule/action.hpp"
#include "tessera/schedule/bubble.hpp"
#include "tessera/schedule/timeline.hpp"

namespace tessera::schedule {

/// Options of to_svg, set with designated initializers: `SvgOptions{.width = 1200}`.
struct SvgOptions {
  int width = 960;         ///< picture width in pixels (>= 200)
  int row_height = 28;     ///< height of one rank's row in pixels (>= 8)
  std::string title{};       ///< title; empty: the timeline's title
  /// Unit printed on the time axis. Empty: chosen from the span ("s", "ms" or "us") and times
  /// are scaled to it; otherwise times are multiplied by `time_scale` and printed with this
  /// unit, e.g. {.time_unit = "t_F", .time_scale = 1.0} for a simulate() timeline with t_F = 1.
  std::string time_unit{};
  double time_scale = 1.0;  ///< multiplier from seconds to `time_unit` (used when time_unit is set)
  bool show_bubble = true;  ///< print the measured bubble ratio under the title
};

namespace detail {
inline std::string svg_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}
inline std::string svg_num(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f", std::abs(x) < 0.005 ? 0.0 : x);
  return buf;
}
inline std::string svg_label(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g", std::abs(x) < 1e-12 ? 0.0 : x);
  return buf;
}
// Base colour blended toward white by `amount` in [0, 1].
inline std::string svg_shade(int r, int g, int b, double amount) {
  auto mix = [amount](int c) { return static_cast<int>(std::lround(c + (255 - c) * amount)); };
  char buf[16];
  std::snprintf(buf, sizeof buf, "#%02x%02x%02x", mix(r), mix(g), mix(b));
  return buf;
}
inline std::string svg_fill(ActionKind k, int chunk, int num_chunks) {
  const double amount = num_chunks > 1 ? 0.55 * chunk / (num_chunks - 1) : 0.0;
  if (k == ActionKind::forward) return svg_shade(0x2f, 0x6f, 0xb3, amount);          // blue
  if (k == ActionKind::backward_weight) return svg_shade(0x3a, 0x9a, 0x4a, amount);  // green
  return svg_shade(0xe0, 0x7b, 0x10, amount);                                        // orange: B and I
}
}  // namespace detail

/// Draws `t` as a standalone SVG document (starts with "<svg", UTF-8, no external resources):
/// one row per rank (rank 0 on top), each F, B, I and W event a box (class "F", "B", "I" or
/// "W") labelled with its micro-batch, forwards blue, backwards and input gradients (I) orange,
/// weight gradients (W) green, later model chunks of interleaved
/// schedules in lighter shades, with a title, a legend, the bubble ratio and a time axis.
/// Transfers are not drawn. Throws Error if width < 200 or row_height < 8.
inline std::string to_svg(const Timeline& t, const SvgOptions& opts = {}) {
  TESSERA_EXPECTS(opts.width >= 200, "to_svg: width must be >= 200 pixels, got ", opts.width);
  TESSERA_EXPECTS(opts.row_height >= 8, "to_svg: row_height must be >= 8 pixels, got ", opts.row_height);
  using tessera::detail::str;
  using detail::svg_num;
  const int ranks = std::max(t.num_ranks, 1);
  const int chunks = t.num_chunks();
  const double left = 64, right = 16, top = opts.show_bubble ? 62 : 44, gap = 4;
  const double row = opts.row_height, plot_w = opts.width - left - right;
  const double plot_h = ranks * row + (ranks - 1) * gap;
  const double height = top + plot_h + 58;
  const double t0 = t.begin(), span = t.span() > 0 ? t.span() : 1.0;
  auto x_of = [&](double time) { return left + (time - t0) / span * plot_w; };

  // Axis unit and step.
  std::string unit = opts.time_unit;
  double scale = opts.time_scale;
  if (unit.empty()) {
    if (span >= 1.0) {
      unit = "s";
      scale = 1.0;
    } else if (span >= 1e-3) {
      unit = "ms";
      scale = 1e3;
    } else {
      unit = "us";
      scale = 1e6;
    }
  }
  const double span_u = span * scale;
  const double raw = span_u / 8.0;
  const double mag = std::pow(10.0, std::floor(std::log10(raw > 0 ? raw : 1.0)));
  double step = mag;
  for (double f : {1.0, 2.0, 5.0, 10.0})
    if (f * mag >= raw) {
      step = f * mag;
      break;
    }

  const std::string title = detail::svg_escape(opts.title.empty() ? t.title : opts.title);
  std::string o;
  o += str("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"", opts.width, "\" height=\"", svg_num(height),
           "\" viewBox=\"0 0 ", opts.width, " ", svg_num(height),
           "\" font-family=\"Helvetica, Arial, sans-serif\">\n");
  o += str("<rect class=\"background\" x=\"0\" y=\"0\" width=\"", opts.width, "\" height=\"", svg_num(height),
           "\" fill=\"white\"/>\n");
  o += str("<text x=\"", svg_num(opts.width / 2.0), "\" y=\"24\" text-anchor=\"middle\" font-size=\"17\" "
           "font-weight=\"bold\">", title, "</text>\n");
  if (opts.show_bubble) {
    const BubbleStats b = bubble_stats(t);
    char buf[160];
    std::snprintf(buf, sizeof buf, "bubble ratio %.3f (idle %.1f%% of the step)", b.bubble_ratio,
                  100.0 * b.idle_fraction);
    o += str("<text x=\"", svg_num(opts.width / 2.0), "\" y=\"44\" text-anchor=\"middle\" font-size=\"12\" "
             "fill=\"#555\">", buf, "</text>\n");
  }
  // Rows.
  for (int r = 0; r < ranks; ++r) {
    const double y = top + r * (row + gap);
    o += str("<rect class=\"row\" x=\"", svg_num(left), "\" y=\"", svg_num(y), "\" width=\"", svg_num(plot_w),
             "\" height=\"", svg_num(row), "\" fill=\"#f2f2f2\"/>\n");
    o += str("<text x=\"", svg_num(left - 8), "\" y=\"", svg_num(y + row / 2 + 4), "\" text-anchor=\"end\" "
             "font-size=\"12\">rank ", r, "</text>\n");
  }
  // Boxes.
  const double font = std::min(12.0, row * 0.5);
  for (const TimelineEvent& e : t.events) {
    if (!e.action.is_compute() || e.rank < 0 || e.rank >= ranks) continue;
    const double x = x_of(e.start), w = std::max(x_of(e.end) - x, 0.5);
    const double y = top + e.rank * (row + gap);
    const char* cls = kind_name(e.action.kind);
    o += str("<rect class=\"", cls, "\" x=\"", svg_num(x), "\" y=\"", svg_num(y + 1), "\" width=\"", svg_num(w),
             "\" height=\"", svg_num(row - 2), "\" fill=\"", detail::svg_fill(e.action.kind, e.chunk, chunks),
             "\" stroke=\"white\" stroke-width=\"1\"><title>", cls, e.action.microbatch, " stage ",
             e.action.stage_index, " chunk ", e.chunk, "</title></rect>\n");
    const std::string label = str(e.action.microbatch);
    if (w >= font * 0.65 * static_cast<double>(label.size()) + 2)
      o += str("<text x=\"", svg_num(x + w / 2), "\" y=\"", svg_num(y + row / 2 + font * 0.35),
               "\" text-anchor=\"middle\" font-size=\"", svg_num(font), "\" fill=\"",
               e.chunk > 0 && chunks > 1 ? "#222" : "white", "\">", label, "</text>\n");
  }
  // Time axis.
  const double ay = top + plot_h + 6;
  o += str("<line x1=\"", svg_num(left), "\" y1=\"", svg_num(ay), "\" x2=\"", svg_num(left + plot_w), "\" y2=\"",
           svg_num(ay), "\" stroke=\"#333\" stroke-width=\"1\"/>\n");
  const int n_ticks = static_cast<int>(std::floor(span_u / step + 1e-9));
  for (int i = 0; i <= n_ticks; ++i) {
    const double x = left + i * step / span_u * plot_w;
    o += str("<line x1=\"", svg_num(x), "\" y1=\"", svg_num(ay), "\" x2=\"", svg_num(x), "\" y2=\"", svg_num(ay + 5),
             "\" stroke=\"#333\" stroke-width=\"1\"/>\n");
    o += str("<text x=\"", svg_num(x), "\" y=\"", svg_num(ay + 17), "\" text-anchor=\"middle\" font-size=\"11\">",
             detail::svg_label(i * step), "</text>\n");
  }
  o += str("<text x=\"", svg_num(left + plot_w), "\" y=\"", svg_num(ay + 32), "\" text-anchor=\"end\" "
           "font-size=\"11\" fill=\"#555\">time (", detail::svg_escape(unit), ")</text>\n");
  // Legend.
  double lx = left;
  const double ly = ay + 24;
  bool split = false;  // a zero-bubble timeline: legend I and W instead of B
  for (const TimelineEvent& e : t.events) split = split || e.action.kind == ActionKind::backward_weight;
  const std::vector<ActionKind> kinds = split ? std::vector<ActionKind>{ActionKind::forward, ActionKind::backward_input,
                                                                        ActionKind::backward_weight}
                                              : std::vector<ActionKind>{ActionKind::forward, ActionKind::backward};
  for (ActionKind k : kinds)
    for (int c = 0; c < chunks; ++c) {
      o += str("<rect class=\"legend\" x=\"", svg_num(lx), "\" y=\"", svg_num(ly), "\" width=\"12\" height=\"12\" "
               "fill=\"", detail::svg_fill(k, c, chunks), "\"/>\n");
      const char* long_name = k == ActionKind::forward          ? "forward"
                              : k == ActionKind::backward_input ? "input grad (I)"
                              : k == ActionKind::backward_weight ? "weight grad (W)"
                                                                 : "backward";
      const std::string text = chunks > 1 ? str(kind_name(k), " chunk ", c) : std::string(long_name);
      o += str("<text x=\"", svg_num(lx + 16), "\" y=\"", svg_num(ly + 10), "\" font-size=\"11\">", text, "</text>\n");
      lx += 28 + 7.0 * static_cast<double>(text.size());
    }
  o += "</svg>\n";
  return o;
}

/// Writes to_svg(t, opts) to the file `path`. Throws Error if it cannot be written.
inline void write_svg(const Timeline& t, const std::string& path, const SvgOptions& opts = {}) {
  std::ofstream out(path);
  TESSERA_EXPECTS(out.good(), "write_svg: cannot open '", path, "' for writing");
  out << to_svg(t, opts);
  TESSERA_EXPECTS(out.good(), "write_svg: writing '", path, "' failed");
}

}  // namespace tessera::schedule
