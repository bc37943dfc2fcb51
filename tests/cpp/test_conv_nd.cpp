// The conv+BN operators for a 1-D, a 3-D (channels_last_3d) and a
// transposed convolution, called from C++ through the dispatcher, against
// torch's convolution + batch_norm in float64: training forward, every
// gradient through autograd in both memory modes, and the eval fold.
#include <convbn.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

namespace {

const auto kDouble = torch::TensorOptions().dtype(torch::kFloat64);

struct ConvCase {
  std::string name;
  std::vector<int64_t> input_sizes, weight_sizes, stride, padding, dilation;
  int64_t groups;
  bool transposed;
  std::vector<int64_t> output_padding;
  bool channels_last_3d;
};

void expect_close(const torch::Tensor& a, const torch::Tensor& b) {
  ASSERT_EQ(a.sizes(), b.sizes());
  EXPECT_TRUE(torch::allclose(a, b, 1e-9, 1e-9))
      << "max abs difference " << (a - b).abs().max().item<double>();
}

class ConvNdTest
    : public ::testing::TestWithParam<std::tuple<ConvCase, bool>> {};

TEST_P(ConvNdTest, TrainAndEvalMatchConvolutionThenBatchNorm) {
  torch::manual_seed(0);
  const auto& [c, memory_efficient] = GetParam();
  torch::Tensor input = torch::randn(c.input_sizes, kDouble);
  if (c.channels_last_3d) {
    input = input.contiguous(torch::MemoryFormat::ChannelsLast3d);
  }
  const int64_t channels =
      c.transposed ? c.weight_sizes[1] * c.groups : c.weight_sizes[0];
  const auto weight = torch::randn(c.weight_sizes, kDouble);
  const auto bias = torch::randn({channels}, kDouble);
  const auto gamma = torch::rand({channels}, kDouble) + 0.5;
  const auto beta = torch::randn({channels}, kDouble);
  const double eps = 1e-5;
  auto conv = [&](const torch::Tensor& x, const torch::Tensor& w,
                  const torch::Tensor& b) {
    return at::convolution(
        x, w, b, c.stride, c.padding, c.dilation, c.transposed,
        c.output_padding, c.groups);
  };

  std::vector<torch::Tensor> ours, ref;
  for (const auto& t : {input, weight, gamma, beta}) {
    ours.push_back(t.clone().requires_grad_());
    ref.push_back(t.clone().requires_grad_());
  }
  const auto out = std::get<0>(convbn::conv_bn_train(
      ours[0], ours[1], bias, ours[2], ours[3], c.stride, c.padding,
      c.dilation, c.groups, eps, memory_efficient, c.transposed,
      c.output_padding));
  const auto ref_out = torch::batch_norm(
      conv(ref[0], ref[1], bias), ref[2], ref[3], {}, {}, /*training=*/true,
      0.1, eps, false);
  expect_close(out, ref_out);
  if (c.channels_last_3d) {
    EXPECT_TRUE(out.is_contiguous(torch::MemoryFormat::ChannelsLast3d));
  }
  const auto grad = torch::randn_like(ref_out);
  (out * grad).sum().backward();
  (ref_out * grad).sum().backward();
  for (size_t i = 0; i < ours.size(); ++i) {
    expect_close(ours[i].grad(), ref[i].grad());
  }

  const auto running_mean = torch::randn({channels}, kDouble);
  const auto running_var = torch::rand({channels}, kDouble) + 0.5;
  const auto eval_out = convbn::conv_bn_eval(
      input, weight, bias, gamma, beta, running_mean, running_var, c.stride,
      c.padding, c.dilation, c.groups, eps, c.transposed, c.output_padding);
  const auto eval_ref = torch::batch_norm(
      conv(input, weight, bias), gamma, beta, running_mean, running_var,
      /*training=*/false, 0.1, eps, false);
  expect_close(eval_out, eval_ref);
}

TEST(ConvNd, TransposedArgumentErrorsNameTheArgument) {
  const auto input = torch::randn({2, 4, 5, 5}, kDouble);
  const auto weight = torch::randn({4, 3, 3, 3}, kDouble);
  try {
    convbn::conv_bn_train(
        input, weight, {}, {}, {}, {2, 2}, {0, 0}, {1, 1}, 1, 1e-5, true,
        /*transposed=*/true, /*output_padding=*/{2, 0});
    FAIL() << "output_padding >= stride was accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("`output_padding`"), std::string::npos)
        << e.what();
  }
  try {
    convbn::conv_bn_train(
        input, weight, {}, {}, {}, {1, 1, 1}, {0, 0}, {1, 1}, 1, 1e-5);
    FAIL() << "three stride values for a 2-D convolution were accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("`stride`"), std::string::npos)
        << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(
    Ranks,
    ConvNdTest,
    ::testing::Combine(
        ::testing::Values(
            ConvCase{"Conv1d", {3, 4, 11}, {6, 2, 3}, {2}, {1}, {2}, 2,
                     false, {0}, false},
            ConvCase{"Conv3dChannelsLast", {2, 3, 5, 6, 4}, {6, 3, 3, 2, 3},
                     {1, 2, 1}, {1, 0, 1}, {1, 1, 1}, 1, false, {0, 0, 0},
                     true},
            ConvCase{"ConvTranspose2d", {3, 4, 5, 4}, {4, 3, 3, 3}, {2, 2},
                     {1, 0}, {1, 2}, 2, true, {1, 1}, false}),
        ::testing::Bool()),
    [](const ::testing::TestParamInfo<std::tuple<ConvCase, bool>>& info) {
      return std::get<0>(info.param).name +
          (std::get<1>(info.param) ? "_MemoryEfficient" : "_SaveConvOutput");
    });

} // namespace
