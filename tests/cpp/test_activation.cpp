// The fused activation from C++: conv_bn_train (both memory modes) and
// conv_bn_eval with each activation, against torch's convolution,
// batch_norm and activation in float64 (forward and every gradient through
// autograd), the LibTorch module's activation option, and the error for an
// unknown name.
#include <convbn.h>
#include <nn/conv_bn2d.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <sstream>
#include <string>
#include <vector>

namespace {

const auto kDouble = torch::TensorOptions().dtype(torch::kFloat64);
constexpr double kSlope = -0.3;

// torch's own form of each activation.
torch::Tensor reference_activation(const std::string& name, const torch::Tensor& z) {
  if (name == "relu") return torch::relu(z);
  if (name == "relu6") return torch::hardtanh(z, 0.0, 6.0);
  if (name == "leaky_relu") return torch::leaky_relu(z, kSlope);
  if (name == "silu") return torch::silu(z);
  if (name == "hardswish") return torch::hardswish(z);
  if (name == "sigmoid") return torch::sigmoid(z);
  if (name == "gelu") return torch::gelu(z);
  return z;
}

void expect_close(const torch::Tensor& a, const torch::Tensor& b) {
  ASSERT_EQ(a.sizes(), b.sizes());
  EXPECT_TRUE(torch::allclose(a, b, 1e-9, 1e-9))
      << "max abs difference " << (a - b).abs().max().item<double>();
}

class ActivationTest
    : public ::testing::TestWithParam<std::tuple<std::string, bool>> {};

TEST_P(ActivationTest, TrainAndEvalMatchBatchNormThenActivation) {
  torch::manual_seed(0);
  const auto& [name, memory_efficient] = GetParam();
  const std::vector<int64_t> stride{1, 2}, padding{1, 0}, dilation{1, 1};
  const auto input = torch::randn({3, 4, 7, 6}, kDouble)
                         .contiguous(torch::MemoryFormat::ChannelsLast);
  const auto weight = torch::randn({6, 4, 3, 3}, kDouble);
  const auto gamma = torch::rand({6}, kDouble) * 2 + 0.5;
  const auto beta = torch::randn({6}, kDouble);
  const double eps = 1e-5;

  std::vector<torch::Tensor> ours, ref;
  for (const auto& t : {input, weight, gamma, beta}) {
    ours.push_back(t.clone().requires_grad_());
    ref.push_back(t.clone().requires_grad_());
  }
  const auto out = std::get<0>(convbn::conv_bn_train(
      ours[0], ours[1], std::nullopt, ours[2], ours[3], stride, padding,
      dilation, 1, eps, memory_efficient, false, {}, name, kSlope));
  const auto ref_out = reference_activation(
      name,
      torch::batch_norm(
          torch::conv2d(ref[0], ref[1], {}, stride, padding, dilation), ref[2],
          ref[3], {}, {}, /*training=*/true, 0.1, eps, false));
  expect_close(out, ref_out);
  const auto grad = torch::randn_like(ref_out);
  (out * grad).sum().backward();
  (ref_out * grad).sum().backward();
  for (size_t i = 0; i < ours.size(); ++i) {
    expect_close(ours[i].grad(), ref[i].grad());
    ours[i].mutable_grad().reset();
    ref[i].mutable_grad().reset();
  }

  // Frozen batch norm: the eval operator's own backward.
  const auto running_mean = torch::randn({6}, kDouble);
  const auto running_var = torch::rand({6}, kDouble) + 0.5;
  const auto eval_out = convbn::conv_bn_eval(
      ours[0], ours[1], std::nullopt, ours[2], ours[3], running_mean,
      running_var, stride, padding, dilation, 1, eps, false, {}, name, kSlope);
  const auto eval_ref = reference_activation(
      name,
      torch::batch_norm(
          torch::conv2d(ref[0], ref[1], {}, stride, padding, dilation), ref[2],
          ref[3], running_mean, running_var, /*training=*/false, 0.1, eps,
          false));
  expect_close(eval_out, eval_ref);
  (eval_out * grad).sum().backward();
  (eval_ref * grad).sum().backward();
  for (size_t i = 0; i < ours.size(); ++i) {
    expect_close(ours[i].grad(), ref[i].grad());
  }
}

INSTANTIATE_TEST_SUITE_P(
    EveryActivation,
    ActivationTest,
    ::testing::Combine(
        ::testing::Values(
            "identity", "relu", "relu6", "leaky_relu", "silu", "hardswish",
            "sigmoid", "gelu"),
        ::testing::Bool()),
    [](const auto& info) {
      return std::get<0>(info.param) +
          (std::get<1>(info.param) ? "_memory_efficient" : "_save_output");
    });

TEST(Activation, ModuleOptionMatchesTheFunctions) {
  torch::manual_seed(0);
  convbn::ConvBN2d module(convbn::ConvBN2dOptions(3, 5, 3)
                              .padding(1)
                              .activation("leaky_relu")
                              .negative_slope(0.2));
  module->to(torch::kFloat64);
  const auto x = torch::randn({2, 3, 6, 6}, kDouble);
  const auto expected = torch::leaky_relu(
      std::get<0>(convbn::conv_bn_train(
          x, module->weight, std::nullopt, module->bn_weight, module->bn_bias,
          {1, 1}, {1, 1}, {1, 1}, 1, 1e-5)),
      0.2);
  expect_close(module->forward(x), expected);
  std::ostringstream printed;
  module->pretty_print(printed);
  EXPECT_NE(printed.str().find("activation=leaky_relu, negative_slope=0.2"),
            std::string::npos)
      << printed.str();
  EXPECT_THROW(convbn::to_modules(module), c10::ValueError);
}

TEST(Activation, UnknownNameIsAnError) {
  const auto x = torch::randn({2, 3, 5, 5});
  const auto w = torch::randn({4, 3, 3, 3});
  try {
    convbn::conv_bn_train(
        x, w, std::nullopt, std::nullopt, std::nullopt, {1, 1}, {0, 0},
        {1, 1}, 1, 1e-5, true, false, {}, "tanh");
    FAIL() << "expected an error";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("unknown `activation` 'tanh'"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(
      convbn::ConvBN2d(convbn::ConvBN2dOptions(3, 4, 3).activation("tanh")),
      c10::ValueError);
}

} // namespace
