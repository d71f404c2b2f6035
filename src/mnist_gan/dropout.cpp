// Dropout for the fused CPU layers: the MLPs' and the conv discriminator's (mnist_gan/cpu_dropout.py
// says why it is written by hand).
//
// Element i of a layer's output is kept when the 16-bit value u_i >= round(p * 65536), so the drop
// rate is p rounded to a multiple of 1/65536. u_i is bits 16*(i%4) .. 16*(i%4)+15 of SplitMix64's
// output for counter i/4 of the stream `seed`: a counter-based generator, so any element's bits
// can be computed in any order, on any thread, and again in the backward pass instead of storing
// the mask. Element i is the i-th of the tensor's memory, in whatever dense layout it has (a
// channels_last feature map is walked in its own order): the backward takes the same layout.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kDraws = 16;            // draws per chunk: kDraws * 4 elements in one inner loop
constexpr int64_t kChunk = 4 * kDraws;
constexpr int64_t kGrain = 4096 / kDraws;  // chunks per parallel task (4096 draws)
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "lanes are read as the draws' uint16 halves");

// SplitMix64 (Steele, Lea & Flood 2014): the mix of the Weyl sequence seed + (block + 1) * gamma
inline uint64_t random_bits(uint64_t seed, uint64_t block) {
  uint64_t z = seed + (block + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline bool kept(uint64_t bits, int64_t lane, uint32_t threshold) {
  return ((bits >> (16 * lane)) & 0xFFFF) >= threshold;
}

struct Mask {
  uint64_t seed;
  uint32_t threshold;
  float scale;  // 1 / (1 - p): what nn.Dropout multiplies the kept elements by

  Mask(int64_t seed, double p)
      : seed(static_cast<uint64_t>(seed)),
        threshold(static_cast<uint32_t>(std::lround(p * 65536))),
        scale(static_cast<float>(1 / (1 - p))) {}
};

// f(i, keep) for every element. In chunks of kDraws draws: the draws in one loop, then the chunk's
// elements in another, each lane read as the draws' uint16 (bits 16*lane .. of a little-endian
// uint64), so that both loops vectorise (measured: 4x faster than a loop over each draw's 4 lanes);
// the elements after the last full chunk one by one.
template <typename F>
void for_each_element(int64_t n, const Mask& mask, F f) {
  int64_t chunks = n / kChunk;
  at::parallel_for(0, chunks, kGrain, [&](int64_t begin, int64_t end) {
    uint64_t draws[kDraws];
    uint16_t lanes[kChunk];
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      for (int64_t d = 0; d < kDraws; ++d) {
        draws[d] = random_bits(mask.seed, chunk * kDraws + d);
      }
      std::memcpy(lanes, draws, sizeof draws);
      for (int64_t j = 0; j < kChunk; ++j) {
        f(chunk * kChunk + j, lanes[j] >= mask.threshold);
      }
    }
  });
  for (int64_t i = chunks * kChunk; i < n; ++i) {
    f(i, kept(random_bits(mask.seed, i / 4), i % 4, mask.threshold));
  }
}

// Loads and stores as float. bfloat16 is converted by hand, not through c10::BFloat16, whose
// conversions the compiler does not vectorise (measured 4x slower here).
inline float load(float x) { return x; }
inline void store(float* p, float x) { *p = x; }
inline float load(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void store(at::BFloat16* p, float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  // round to nearest even, as c10::BFloat16 does; a NaN stays a (quiet) NaN
  uint32_t rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
  p->x = static_cast<uint16_t>((bits & 0x7FFFFFFF) > 0x7F800000 ? 0x7FC0 : rounded);
}

// The activations, as mnist_gan.cpu_dropout.Activation names and numbers them: the build defines
// MNIST_GAN_ACTIVATIONS from that table ("none=0,relu=1,..."), and compiles with -Werror=switch, so
// backward_typed's switch has a case, and derivative a formula, for every activation of the table:
// the two cannot drift apart.
#ifndef MNIST_GAN_ACTIVATIONS
#error "MNIST_GAN_ACTIVATIONS is defined by mnist_gan.cpu_dropout's build"
#endif
enum class Activation : int64_t { MNIST_GAN_ACTIVATIONS };

// The activations themselves, for a layer whose product cannot apply them (a convolution's output)
template <Activation A>
inline float activate(float h, float slope) {
  if constexpr (A == Activation::none) {
    return h;
  } else if constexpr (A == Activation::relu) {
    return h > 0.f ? h : 0.f;
  } else if constexpr (A == Activation::leaky_relu) {
    return h > 0.f ? h : h * slope;
  } else if constexpr (A == Activation::tanh) {
    return std::tanh(h);
  } else {
    static_assert(A != A, "no formula for this activation");
  }
}

// The activations' derivatives from out = act(h) * keep, where keep > 0: relu and leaky_relu need
// only the sign of act(h), which the scaling keeps; tanh's needs act(h) = out / scale.
// forward_typed's and backward_typed's switches instantiate these for every activation, so one
// without a formula and a derivative here does not compile.
template <Activation A>
inline float derivative(float out, float scale, float slope) {
  if constexpr (A == Activation::none) {
    return 1.f;
  } else if constexpr (A == Activation::relu) {
    return out > 0.f ? 1.f : 0.f;
  } else if constexpr (A == Activation::leaky_relu) {
    return out > 0.f ? 1.f : slope;
  } else if constexpr (A == Activation::tanh) {
    float y = out / scale;
    return 1.f - y * y;
  } else {
    static_assert(A != A, "no derivative for this activation");
  }
}

template <Activation A, typename T>
void forward_kernel(T* y, int64_t n, const Mask& mask, float slope) {
  for_each_element(n, mask, [&](int64_t i, bool keep) {
    store(y + i, keep ? activate<A>(load(y[i]), slope) * mask.scale : 0.f);
  });
}

template <typename T>
void forward_typed(at::Tensor& y, const Mask& mask, Activation activation, float slope) {
  T* p = y.mutable_data_ptr<T>();
  int64_t n = y.numel();
  switch (activation) {
    case Activation::none: return forward_kernel<Activation::none>(p, n, mask, slope);
    case Activation::relu: return forward_kernel<Activation::relu>(p, n, mask, slope);
    case Activation::leaky_relu: return forward_kernel<Activation::leaky_relu>(p, n, mask, slope);
    case Activation::tanh: return forward_kernel<Activation::tanh>(p, n, mask, slope);
  }
  TORCH_CHECK(false, "no activation numbered ", static_cast<int64_t>(activation),
              " (mnist_gan.cpu_dropout.Activation numbers them)");
}

template <Activation A, typename T>
void backward_kernel(const T* grad, const T* out, T* grad_h, int64_t n, const Mask& mask, float slope) {
  for_each_element(n, mask, [&](int64_t i, bool keep) {
    float g = load(grad[i]) * mask.scale * derivative<A>(load(out[i]), mask.scale, slope);
    store(grad_h + i, keep ? g : 0.f);
  });
}

template <typename T>
void backward_typed(const at::Tensor& grad, const at::Tensor& out, at::Tensor& grad_h, const Mask& mask,
                    Activation activation, float slope) {
  const T* g = grad.const_data_ptr<T>();
  const T* o = out.const_data_ptr<T>();
  T* gh = grad_h.mutable_data_ptr<T>();
  int64_t n = out.numel();
  switch (activation) {
    case Activation::none: return backward_kernel<Activation::none>(g, o, gh, n, mask, slope);
    case Activation::relu: return backward_kernel<Activation::relu>(g, o, gh, n, mask, slope);
    case Activation::leaky_relu: return backward_kernel<Activation::leaky_relu>(g, o, gh, n, mask, slope);
    case Activation::tanh: return backward_kernel<Activation::tanh>(g, o, gh, n, mask, slope);
  }
  TORCH_CHECK(false, "no activation numbered ", static_cast<int64_t>(activation),
              " (mnist_gan.cpu_dropout.Activation numbers them)");
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_non_overlapping_and_dense(), name,
              " must be a dense CPU tensor (contiguous in some memory format)");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              name, " must be float32 or bfloat16, not ", t.scalar_type());
}

}  // namespace

// y = act(y) * keep / (1 - p), in place: a layer's output becomes its activation's dropout output
// (activation none: oneDNN's post-op applied it already)
void dropout_(at::Tensor y, int64_t seed, double p, int64_t activation_code, double slope) {
  check(y, "y");
  Mask mask(seed, p);
  auto activation = static_cast<Activation>(activation_code);
  if (y.scalar_type() == at::kFloat) {
    forward_typed<float>(y, mask, activation, static_cast<float>(slope));
  } else {
    forward_typed<at::BFloat16>(y, mask, activation, static_cast<float>(slope));
  }
}

// d loss / d h of out = act(h) * keep / (1 - p), from d loss / d out and out: the same mask
// (same seed and p) recomputed, times the activation's derivative
at::Tensor dropout_backward(at::Tensor grad, at::Tensor out, int64_t seed, double p,
                            int64_t activation_code, double slope) {
  check(out, "out");
  auto activation = static_cast<Activation>(activation_code);
  TORCH_CHECK(grad.sizes() == out.sizes(), "grad and out differ in shape");
  // element i of grad, out and grad_h must be the same element: out's layout for all three
  // (empty_like keeps a dense tensor's strides)
  auto grad_h = at::empty_like(out);
  if (grad.scalar_type() != out.scalar_type() || grad.strides() != out.strides()) {
    grad = grad_h.copy_(grad);
  }
  Mask mask(seed, p);
  if (out.scalar_type() == at::kFloat) {
    backward_typed<float>(grad, out, grad_h, mask, activation, static_cast<float>(slope));
  } else {
    backward_typed<at::BFloat16>(grad, out, grad_h, mask, activation, static_cast<float>(slope));
  }
  return grad_h;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dropout_", &dropout_, "in-place activation and dropout of a layer's output", pybind11::arg("y"),
        pybind11::arg("seed"), pybind11::arg("p"), pybind11::arg("activation") = 0,
        pybind11::arg("slope") = 0.0);
  m.def("dropout_backward", &dropout_backward, "the gradient through dropout and the activation");
}
