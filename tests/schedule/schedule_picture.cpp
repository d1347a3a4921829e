// Draws the schedule pictures of docs/schedules.md from simulated timelines (t_F = 1, t_B = 2).
//   schedule_picture DIR          writes DIR/gpipe_p4_m8.svg, DIR/1f1b_p4_m8.svg,
//                                 DIR/interleaved_p4_v2_m8.svg, DIR/zb_h1_p4_m8.svg (t_I = t_W = 1)
//   schedule_picture --check DIR  exits 1 if a file in DIR differs from what would be written
//                                 (the test that keeps the committed pictures up to date)
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "tessera/schedule/all.hpp"

namespace ts = tessera::schedule;

int main(int argc, char** argv) {
  const bool check = argc == 3 && std::string(argv[1]) == "--check";
  if (!(argc == 2 || check)) {
    std::cerr << "usage: " << argv[0] << " [--check] DIR\n";
    return 2;
  }
  const std::string dir = argv[argc - 1];
  const std::vector<std::pair<std::string, ts::Schedule>> pictures = {
      {"gpipe_p4_m8.svg", ts::GPipe{.num_microbatches = 8}.build(4)},
      {"1f1b_p4_m8.svg", ts::OneFOneB{.num_microbatches = 8}.build(4)},
      {"interleaved_p4_v2_m8.svg", ts::InterleavedOneFOneB{.num_microbatches = 8, .virtual_stages = 2}.build(4)},
      {"zb_h1_p4_m8.svg", ts::ZeroBubbleH1{.num_microbatches = 8}.build(4)},  // t_I = t_W = 1
  };
  int stale = 0;
  for (const auto& [file, schedule] : pictures) {
    const ts::Timeline timeline = ts::simulate(schedule, {.t_forward = 1.0, .t_backward = 2.0, .t_backward_input = 1.0,
                                                          .t_backward_weight = 1.0, .duration = {}, .transfer_duration = {}});
    const std::string svg = ts::to_svg(timeline, {.width = 960, .row_height = 28, .title = {}, .time_unit = "t_F",
                                                  .time_scale = 1.0, .show_bubble = true});
    const std::string path = dir + "/" + file;
    if (check) {
      std::ifstream in(path);
      std::stringstream have;
      have << in.rdbuf();
      if (!in || have.str() != svg) {
        std::cerr << path << " is out of date: run build/tests/schedule/schedule_picture " << dir << "\n";
        ++stale;
      }
    } else {
      std::ofstream out(path);
      out << svg;
      if (!out) {
        std::cerr << "cannot write " << path << "\n";
        return 1;
      }
      std::cout << "wrote " << path << "\n";
    }
  }
  return stale == 0 ? 0 : 1;
}
