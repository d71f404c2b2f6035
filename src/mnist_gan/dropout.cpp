// Dropout for the MLPs' fused CPU layers (mnist_gan/cpu_dropout.py says why it is written by hand).
//
// Element i of a layer's output is kept when the 16-bit value u_i >= round(p * 65536), so the drop
// rate is p rounded to a multiple of 1/65536. u_i is bits 16*(i%4) .. 16*(i%4)+15 of SplitMix64's
// output for counter i/4 of the stream `seed`: a counter-based generator, so any element's bits
// can be computed in any order, on any thread, and again in the backward pass instead of storing
// the mask.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kGrain = 4096;  // blocks of 4 elements per parallel chunk

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

// f(i, keep) for every element, in blocks of the 4 elements that share one draw; the full blocks
// in a loop of constant trip count, which the compiler vectorises
template <typename F>
void for_each_element(int64_t n, const Mask& mask, F f) {
  int64_t full = n / 4;
  at::parallel_for(0, full, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      uint64_t bits = random_bits(mask.seed, block);
      for (int64_t lane = 0; lane < 4; ++lane) {
        f(4 * block + lane, kept(bits, lane, mask.threshold));
      }
    }
  });
  uint64_t bits = random_bits(mask.seed, full);
  for (int64_t i = 4 * full; i < n; ++i) {
    f(i, kept(bits, i - 4 * full, mask.threshold));
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

template <typename T>
void dropout_kernel(T* y, int64_t n, const Mask& mask) {
  for_each_element(n, mask, [&](int64_t i, bool keep) {
    store(y + i, keep ? load(y[i]) * mask.scale : 0.f);
  });
}

// The activations, as mnist_gan.cpu_dropout.Activation names and numbers them: the build defines
// MNIST_GAN_ACTIVATIONS from that table ("none=0,relu=1,..."), and compiles with -Werror=switch, so
// backward_typed's switch has a case, and derivative a formula, for every activation of the table:
// the two cannot drift apart.
#ifndef MNIST_GAN_ACTIVATIONS
#error "MNIST_GAN_ACTIVATIONS is defined by mnist_gan.cpu_dropout's build"
#endif
enum class Activation : int64_t { MNIST_GAN_ACTIVATIONS };

// The activations' derivatives from out = act(h) * keep, where keep > 0: relu and leaky_relu need
// only the sign of act(h), which the scaling keeps; tanh's needs act(h) = out / scale.
// backward_typed's switch instantiates this for every activation, so one without a derivative here
// does not compile.
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
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              name, " must be float32 or bfloat16, not ", t.scalar_type());
}

}  // namespace

// y = y * keep / (1 - p), in place: the layer's activation output becomes its dropout output
void dropout_(at::Tensor y, int64_t seed, double p) {
  check(y, "y");
  Mask mask(seed, p);
  if (y.scalar_type() == at::kFloat) {
    dropout_kernel(y.mutable_data_ptr<float>(), y.numel(), mask);
  } else {
    dropout_kernel(y.mutable_data_ptr<at::BFloat16>(), y.numel(), mask);
  }
}

// d loss / d h of out = act(h) * keep / (1 - p), from d loss / d out and out: the same mask
// (same seed and p) recomputed, times the activation's derivative
at::Tensor dropout_backward(at::Tensor grad, at::Tensor out, int64_t seed, double p,
                            int64_t activation_code, double slope) {
  check(out, "out");
  auto activation = static_cast<Activation>(activation_code);
  grad = grad.to(out.scalar_type()).contiguous();
  TORCH_CHECK(grad.sizes() == out.sizes(), "grad and out differ in shape");
  auto grad_h = at::empty_like(out);
  Mask mask(seed, p);
  if (out.scalar_type() == at::kFloat) {
    backward_typed<float>(grad, out, grad_h, mask, activation, static_cast<float>(slope));
  } else {
    backward_typed<at::BFloat16>(grad, out, grad_h, mask, activation, static_cast<float>(slope));
  }
  return grad_h;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dropout_", &dropout_, "in-place dropout of a layer's output");
  m.def("dropout_backward", &dropout_backward, "the gradient through dropout and the activation");
}
