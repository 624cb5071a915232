// The only pybind11 glue of sparseattn._C. Pointers arrive as Python ints (tensor.data_ptr()),
// streams as ints (torch.cuda.Stream.cuda_stream). Every launch runs with the GIL released and
// the tensors' device made current (and restored). C++ exceptions become Python exceptions:
// std::invalid_argument -> ValueError, std::runtime_error (CUDA errors) -> RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "common.h"
#include "decode.h"
#include "layout_builder.h"

namespace py = pybind11;
using namespace sparseattn;

namespace {

template <typename T>
T* as_ptr(std::uintptr_t v) {
  return reinterpret_cast<T*>(v);
}

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// (mask, bl, hl, rows, cols, s_b, s_h, s_row, s_col, counts, indices, width)
using JobTuple = std::tuple<std::uintptr_t, int, int, int, int, int64_t, int64_t, int64_t, int64_t, std::uintptr_t,
                            std::uintptr_t, int>;

std::vector<ListJob> to_jobs(const std::vector<JobTuple>& in) {
  std::vector<ListJob> jobs;
  for (const auto& t : in) {
    ListJob j;
    j.mask = as_ptr<const uint8_t>(std::get<0>(t));
    j.bl = std::get<1>(t);
    j.hl = std::get<2>(t);
    j.rows = std::get<3>(t);
    j.cols = std::get<4>(t);
    j.s_b = std::get<5>(t);
    j.s_h = std::get<6>(t);
    j.s_row = std::get<7>(t);
    j.s_col = std::get<8>(t);
    j.counts = as_ptr<int32_t>(std::get<9>(t));
    j.indices = as_ptr<int32_t>(std::get<10>(t));
    j.width = std::get<11>(t);
    jobs.push_back(j);
  }
  return jobs;
}

}  // namespace

#define PTR_FIELD(cls, name, type)                                                                \
  cls.def_property(                                                                               \
      #name, [](const DecodeParams& p) { return reinterpret_cast<std::uintptr_t>(p.name); },      \
      [](DecodeParams& p, std::uintptr_t v) { p.name = reinterpret_cast<type>(v); })

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparseattn CUDA extension: sparse decode attention and the GPU layout builder.";
  m.attr("cuda_archs") = SPARSEATTN_CUDA_ARCHS_STR;
  m.attr("decode_max_lq") = kDecodeMaxLq;

  m.def("device_unavailable_reason", &device_unavailable_reason, py::arg("device"),
        "'' when the device can run this extension's kernels, else why not.",
        py::call_guard<py::gil_scoped_release>());
  m.def("num_sms", &num_sms, py::arg("device"), py::call_guard<py::gil_scoped_release>());
  m.def("decode_num_splits", &decode_num_splits, py::arg("num_sms"), py::arg("B"), py::arg("Hq"), py::arg("Hkv"),
        py::arg("Lq"), py::arg("max_keys"));

  py::enum_<DType>(m, "DType").value("float16", DType::kFloat16).value("bfloat16", DType::kBFloat16);

  py::class_<DecodeParams> dp(m, "DecodeParams", "Arguments of decode_attention (see csrc/decode.h).");
  dp.def(py::init<>());
  PTR_FIELD(dp, q, const void*);
  PTR_FIELD(dp, k, const void*);
  PTR_FIELD(dp, v, const void*);
  PTR_FIELD(dp, out, void*);
  PTR_FIELD(dp, lse, float*);
  PTR_FIELD(dp, o_part, float*);
  PTR_FIELD(dp, lse_part, float*);
  PTR_FIELD(dp, seqlens, const int32_t*);
  PTR_FIELD(dp, blk_num, const int32_t*);
  PTR_FIELD(dp, blk_idx, const int32_t*);
  PTR_FIELD(dp, head_mask, const uint8_t*);
  PTR_FIELD(dp, block_table, const int32_t*);
  PTR_FIELD(dp, alibi, const float*);
  PTR_FIELD(dp, key_bias, const float*);
  PTR_FIELD(dp, key_padding, const uint8_t*);
  dp.def_readwrite("q_sb", &DecodeParams::q_sb).def_readwrite("q_sh", &DecodeParams::q_sh)
      .def_readwrite("q_sl", &DecodeParams::q_sl).def_readwrite("k_sb", &DecodeParams::k_sb)
      .def_readwrite("k_sh", &DecodeParams::k_sh).def_readwrite("k_sl", &DecodeParams::k_sl)
      .def_readwrite("v_sb", &DecodeParams::v_sb).def_readwrite("v_sh", &DecodeParams::v_sh)
      .def_readwrite("v_sl", &DecodeParams::v_sl).def_readwrite("o_sb", &DecodeParams::o_sb)
      .def_readwrite("o_sh", &DecodeParams::o_sh).def_readwrite("o_sl", &DecodeParams::o_sl)
      .def_readwrite("blk_width", &DecodeParams::blk_width).def_readwrite("block_k", &DecodeParams::block_k)
      .def_readwrite("mask_b", &DecodeParams::mask_b).def_readwrite("mask_h", &DecodeParams::mask_h)
      .def_readwrite("n_kblocks", &DecodeParams::n_kblocks).def_readwrite("B", &DecodeParams::B)
      .def_readwrite("Hq", &DecodeParams::Hq).def_readwrite("Hkv", &DecodeParams::Hkv)
      .def_readwrite("Lq", &DecodeParams::Lq).def_readwrite("Lmax", &DecodeParams::Lmax)
      .def_readwrite("D", &DecodeParams::D).def_readwrite("scale", &DecodeParams::scale)
      .def_readwrite("num_splits", &DecodeParams::num_splits).def_readwrite("dtype", &DecodeParams::dtype)
      .def_readwrite("bt_sb", &DecodeParams::bt_sb).def_readwrite("max_pages", &DecodeParams::max_pages)
      .def_readwrite("page_size", &DecodeParams::page_size).def_readwrite("num_pages", &DecodeParams::num_pages)
      .def_readwrite("softcap", &DecodeParams::softcap).def_readwrite("alibi_sb", &DecodeParams::alibi_sb)
      .def_readwrite("kb_sb", &DecodeParams::kb_sb).def_readwrite("kb_sh", &DecodeParams::kb_sh)
      .def_readwrite("kpm_sb", &DecodeParams::kpm_sb);

  m.def(
      "decode_attention",
      [](const DecodeParams& p, int device, std::uintptr_t stream) {
        DeviceGuard guard(device);
        decode_attention(p, as_stream(stream));
      },
      py::arg("params"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Launch the split and combine kernels of sparse decode on `stream` of `device`.");

  m.def(
      "build_lists_count",
      [](const std::vector<JobTuple>& jobs, std::uintptr_t max_counts, int device, std::uintptr_t stream) {
        const std::vector<ListJob> js = to_jobs(jobs);
        py::gil_scoped_release nogil;
        DeviceGuard guard(device);
        build_lists_count(js.data(), (int)js.size(), as_ptr<int32_t>(max_counts), as_stream(stream));
      },
      py::arg("jobs"), py::arg("max_counts"), py::arg("device"), py::arg("stream"),
      "Pass 1 of the layout builder: counts and the largest count of each job.");
  m.def(
      "build_lists_fill",
      [](const std::vector<JobTuple>& jobs, int device, std::uintptr_t stream) {
        const std::vector<ListJob> js = to_jobs(jobs);
        py::gil_scoped_release nogil;
        DeviceGuard guard(device);
        build_lists_fill(js.data(), (int)js.size(), as_stream(stream));
      },
      py::arg("jobs"), py::arg("device"), py::arg("stream"), "Pass 2 of the layout builder: sorted indices.");
}
