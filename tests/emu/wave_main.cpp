// wave_main.cpp -- runs portability/warp.cuh's wave functions on IK_WARP_SIZE host threads.
//
// stdin:  T, then per trial: src warp_index, then per lane: x (float) n (int) p (0/1).
// stdout: per trial, one line per result: `name v_0 ... v_{W-1}` (one value per lane), then `end`.
// Build: g++ -std=c++20 -pthread -DIK_WARP_SIZE=64 -DEMU_LANE_MASK_T="unsigned long long"
//        -I tests/emu -I portability tests/emu/wave_main.cpp   (tests/test_wave_emulation.py)
#include "wave_emu.hpp"
// The real shim, unchanged:
#include "warp.cuh"

#include <cstdio>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int W = ik::kWarpSize;

struct Trial {
  float x[W];
  int n[W];
  int p[W];
  int src, warp_index;
};

template <class T>
std::string fmt(T v) {  // floats round-trip exactly with 9 significant digits
  if constexpr (std::is_floating_point_v<T>) {
    char b[32];
    std::snprintf(b, sizeof b, "%.9g", v);
    return b;
  } else {
    return std::to_string(v);
  }
}

template <int G, class Put>
void group_reductions(float x, Put& put) {  // widths G, 2G, ..., W
  put("group_sum_" + std::to_string(G), ik::group_sum<G>(x));
  put("group_max_" + std::to_string(G), ik::group_max<G>(x));
  if constexpr (G < W) group_reductions<2 * G>(x, put);
}

// Every lane runs exactly this sequence (shuffles must be reached by the whole wave).
// `put(name, value)` records this lane's value of `name`.
template <class Put>
void lane_program(const Trial& t, int lane, Put& put) {
  const float x = t.x[lane];
  const int n = t.n[lane];
  put("lane_id", ik::lane_id());
  put("warp_id", ik::warp_id());
  group_reductions<1>(x, put);
  put("warp_sum", ik::warp_sum(x));
  put("warp_max", ik::warp_max(x));
  for (int m = 1; m < W; m *= 2) {
    put("shfl_xor_f_" + std::to_string(m), ik::shfl_xor(x, m));
    put("shfl_xor_i_" + std::to_string(m), ik::shfl_xor(n, m));
  }
  for (int width = 1; width <= W; width *= 2) {
    put("broadcast_f_" + std::to_string(width), ik::broadcast(x, t.src % width, width));
    put("broadcast_i_" + std::to_string(width), ik::broadcast(n, t.src % width, width));
  }
  put("ballot", ik::ballot(t.p[lane] != 0));
  put("any", static_cast<int>(ik::any(t.p[lane] != 0)));
  put("mask_bytes", static_cast<int>(sizeof(ik::lane_mask_t)));
}

bool read(float& v) { return std::scanf("%f", &v) == 1; }
bool read(int& v) { return std::scanf("%d", &v) == 1; }

}  // namespace

int main() {
  int trials = 0;
  if (!read(trials)) return 2;
  std::vector<Trial> in(trials);
  for (Trial& t : in) {
    bool ok = read(t.src) && read(t.warp_index);
    for (int l = 0; l < W; ++l) ok = ok && read(t.x[l]) && read(t.n[l]) && read(t.p[l]);
    if (!ok) return 2;
  }
  std::vector<std::vector<std::pair<std::string, std::string>>> out(static_cast<size_t>(trials) * W);
  std::vector<std::thread> lanes;
  for (int l = 0; l < W; ++l) {
    lanes.emplace_back([&, l] {
      emu::lane = l;
      for (int k = 0; k < trials; ++k) {
        threadIdx.x = static_cast<unsigned int>(in[k].warp_index * W + l);
        auto& mine = out[static_cast<size_t>(k) * W + l];
        auto put = [&](const std::string& name, auto v) { mine.emplace_back(name, fmt(v)); };
        lane_program(in[k], l, put);
      }
    });
  }
  for (auto& t : lanes) t.join();
  for (int k = 0; k < trials; ++k) {
    const auto& first = out[static_cast<size_t>(k) * W];
    for (size_t row = 0; row < first.size(); ++row) {
      std::printf("%s", first[row].first.c_str());
      for (int l = 0; l < W; ++l) std::printf(" %s", out[static_cast<size_t>(k) * W + l][row].second.c_str());
      std::printf("\n");
    }
    std::printf("end\n");
  }
  return 0;
}
