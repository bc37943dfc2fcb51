// The convbn operators called from C++ through the dispatcher (no Python in
// the process), against torch::conv2d + torch::batch_norm in float64.
#include <convbn.h>

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch/version.h>

namespace {

const auto kDouble = torch::TensorOptions().dtype(torch::kFloat64);

struct Inputs {
  torch::Tensor input = torch::randn({3, 4, 7, 6}, kDouble);
  torch::Tensor weight = torch::randn({6, 2, 3, 3}, kDouble);
  torch::Tensor bias = torch::randn({6}, kDouble);
  torch::Tensor gamma = torch::rand({6}, kDouble) + 0.5;
  torch::Tensor beta = torch::randn({6}, kDouble);
  std::vector<int64_t> stride{2, 1}, padding{1, 1}, dilation{1, 2};
  int64_t groups = 2;
  double eps = 1e-5;

  torch::Tensor conv(const torch::Tensor& x, const torch::Tensor& w,
                     const torch::Tensor& b) const {
    return torch::conv2d(x, w, b, stride, padding, dilation, groups);
  }
};

void expect_close(const torch::Tensor& a, const torch::Tensor& b) {
  ASSERT_EQ(a.sizes(), b.sizes());
  EXPECT_TRUE(torch::allclose(a, b, 1e-9, 1e-9))
      << "max abs difference " << (a - b).abs().max().item<double>();
}

class ConvBNTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    torch::manual_seed(0);
  }
};

TEST_P(ConvBNTest, TrainForwardMatchesConvThenBatchNorm) {
  Inputs in;
  auto [out, mean, invstd, conv_out] = convbn::conv_bn_train(
      in.input, in.weight, in.bias, in.gamma, in.beta, in.stride, in.padding,
      in.dilation, in.groups, in.eps, /*memory_efficient=*/GetParam());
  auto y = in.conv(in.input, in.weight, in.bias);
  auto ref = torch::batch_norm(
      y, in.gamma, in.beta, {}, {}, /*training=*/true, 0.1, in.eps, false);
  expect_close(out, ref);
  expect_close(mean, y.mean({0, 2, 3}));
  expect_close(
      invstd, (y.var({0, 2, 3}, /*unbiased=*/false) + in.eps).rsqrt());
  EXPECT_EQ(conv_out.numel() == 0, GetParam());
}

TEST_P(ConvBNTest, BackwardThroughAutogradMatchesReference) {
  Inputs in;
  std::vector<torch::Tensor> ours{
      in.input.clone().requires_grad_(), in.weight.clone().requires_grad_(),
      in.gamma.clone().requires_grad_(), in.beta.clone().requires_grad_()};
  std::vector<torch::Tensor> ref{
      in.input.clone().requires_grad_(), in.weight.clone().requires_grad_(),
      in.gamma.clone().requires_grad_(), in.beta.clone().requires_grad_()};
  auto out = std::get<0>(convbn::conv_bn_train(
      ours[0], ours[1], in.bias, ours[2], ours[3], in.stride, in.padding,
      in.dilation, in.groups, in.eps, GetParam()));
  auto ref_out = torch::batch_norm(
      in.conv(ref[0], ref[1], in.bias), ref[2], ref[3], {}, {}, true, 0.1,
      in.eps, false);
  auto grad = torch::randn_like(ref_out);
  out.backward(grad);
  ref_out.backward(grad);
  for (size_t i = 0; i < ours.size(); ++i) {
    expect_close(ours[i].grad(), ref[i].grad());
  }
}

TEST(ConvBN, RunningStatisticsMatchBatchNorm) {
  torch::manual_seed(0);
  Inputs in;
  auto running_mean = torch::randn({6}, kDouble);
  auto running_var = torch::rand({6}, kDouble) + 0.5;
  auto count = torch::zeros({}, torch::kLong);
  auto ref_mean = running_mean.clone(), ref_var = running_var.clone();
  for (int step = 0; step < 3; ++step) {
    auto x = in.input + step;
    auto [out, mean, invstd, conv_out] = convbn::conv_bn_train(
        x, in.weight, in.bias, in.gamma, in.beta, in.stride, in.padding,
        in.dilation, in.groups, in.eps);
    convbn::update_running_stats(
        running_mean, running_var, count, mean, invstd, in.eps, 0.2,
        out.size(0) * out.size(2) * out.size(3));
    torch::batch_norm(
        in.conv(x, in.weight, in.bias), in.gamma, in.beta, ref_mean, ref_var,
        true, 0.2, in.eps, false);
  }
  expect_close(running_mean, ref_mean);
  expect_close(running_var, ref_var);
  EXPECT_EQ(count.item<int64_t>(), 3);
}

TEST(ConvBN, EvalMatchesConvThenBatchNorm) {
  torch::manual_seed(0);
  Inputs in;
  auto running_mean = torch::randn({6}, kDouble);
  auto running_var = torch::rand({6}, kDouble) + 0.5;
  auto out = convbn::conv_bn_eval(
      in.input, in.weight, in.bias, in.gamma, in.beta, running_mean,
      running_var, in.stride, in.padding, in.dilation, in.groups, in.eps);
  auto ref = torch::batch_norm(
      in.conv(in.input, in.weight, in.bias), in.gamma, in.beta, running_mean,
      running_var, false, 0.1, in.eps, false);
  expect_close(out, ref);
}

TEST(ConvBN, BadInputThrowsAndLeavesStatisticsAlone) {
  Inputs in;
  EXPECT_THROW(
      convbn::conv_bn_train(
          in.input[0], in.weight, in.bias, in.gamma, in.beta, in.stride,
          in.padding, in.dilation, in.groups, in.eps),
      c10::Error);
  EXPECT_THROW(
      convbn::conv_bn_train(
          in.input, in.weight, in.bias, in.gamma, in.beta, in.stride,
          in.padding, in.dilation, /*groups=*/3, in.eps),
      c10::Error);
  auto running_mean = torch::zeros({6}, kDouble);
  auto running_var = torch::ones({6}, kDouble);
  auto count = torch::zeros({}, torch::kLong);
  EXPECT_THROW(
      convbn::update_running_stats(
          running_mean, running_var, count, torch::randn({6}, kDouble),
          torch::rand({6}, kDouble), in.eps, std::nan(""), 10),
      c10::Error);
  EXPECT_TRUE(torch::equal(running_mean, torch::zeros({6}, kDouble)));
  EXPECT_TRUE(torch::equal(running_var, torch::ones({6}, kDouble)));
  EXPECT_EQ(count.item<int64_t>(), 0);
}

INSTANTIATE_TEST_SUITE_P(
    MemoryModes,
    ConvBNTest,
    ::testing::Values(true, false),
    [](const ::testing::TestParamInfo<bool>& info) {
      return info.param ? std::string("MemoryEfficient")
                        : std::string("SaveConvOutput");
    });

} // namespace

// build_info() names the LibTorch this library was compiled against (the
// one this test links) and the CPU kernel builds it holds, one per line.
TEST(ConvBN, BuildInfoNamesTorchAndKernels) {
  const std::string info = convbn::build_info();
  EXPECT_NE(info.find("torch=" TORCH_VERSION "\n"), std::string::npos) << info;
  EXPECT_NE(info.find("cpu_kernels=default"), std::string::npos) << info;
  EXPECT_NE(info.find("cpu_kernels_used="), std::string::npos) << info;
  EXPECT_EQ(info, std::string(convbn_build_info()));
}
