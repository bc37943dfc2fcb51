// convbn::ConvBN2d (the LibTorch module) against torch::nn::Conv2d followed
// by torch::nn::BatchNorm2d, in float64: a few training steps (outputs, every
// grad, running statistics, num_batches_tracked), then eval.
#include <nn/conv_bn2d.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <sstream>
#include <string>

namespace {

struct Case {
  std::string name;
  convbn::ConvBN2dOptions options;
  std::vector<int64_t> input_shape;
};

std::ostream& operator<<(std::ostream& os, const Case& c) {
  return os << c.name;
}

// Max |a - b| <= tol * max(1, max |b|): float64, so only summation order differs.
void expect_close(const torch::Tensor& a, const torch::Tensor& b, const std::string& what) {
  ASSERT_EQ(a.defined(), b.defined()) << what;
  if (!a.defined()) {
    return;
  }
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  const double scale = std::max(1.0, b.abs().max().item<double>());
  const double err = (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
  EXPECT_LE(err, 1e-9 * scale) << what << ": max abs difference " << err;
}

class ConvBN2dModuleTest : public ::testing::TestWithParam<Case> {};

TEST_P(ConvBN2dModuleTest, TrainingStepsAndEvalMatchTheConvBatchNormPair) {
  torch::manual_seed(0);
  const Case& c = GetParam();
  torch::nn::Conv2d conv(c.options.conv_options());
  torch::nn::BatchNorm2d bn(c.options.bn_options());
  conv->to(torch::kFloat64);
  bn->to(torch::kFloat64);
  if (c.options.affine()) {
    torch::NoGradGuard no_grad;
    bn->weight.uniform_(0.5, 1.5);
    bn->bias.uniform_(-1, 1);
  }
  convbn::ConvBN2d fused = convbn::from_modules(conv, bn, c.options.memory_efficient());
  ASSERT_EQ(fused->weight.scalar_type(), torch::kFloat64);

  for (int step = 0; step < 3; ++step) {
    const auto x = torch::randn(c.input_shape, torch::kFloat64) * 2 + 0.5;
    const auto x_ref = x.clone().requires_grad_();
    const auto x_ours = x.clone().requires_grad_();
    const auto y_ref = bn(conv(x_ref));
    const auto y_ours = fused(x_ours);
    const std::string at = " (step " + std::to_string(step) + ")";
    expect_close(y_ours, y_ref, "output" + at);

    const auto grad = torch::randn_like(y_ref);
    y_ref.backward(grad);
    y_ours.backward(grad);
    expect_close(x_ours.grad(), x_ref.grad(), "input grad" + at);
    expect_close(fused->weight.grad(), conv->weight.grad(), "weight grad" + at);
    if (c.options.bias()) {
      expect_close(fused->bias.grad(), conv->bias.grad(), "bias grad" + at);
    }
    if (c.options.affine()) {
      expect_close(fused->bn_weight.grad(), bn->weight.grad(), "bn_weight grad" + at);
      expect_close(fused->bn_bias.grad(), bn->bias.grad(), "bn_bias grad" + at);
    }
    if (c.options.track_running_stats()) {
      expect_close(fused->running_mean, bn->running_mean, "running_mean" + at);
      expect_close(fused->running_var, bn->running_var, "running_var" + at);
      EXPECT_EQ(fused->num_batches_tracked.item<int64_t>(),
                bn->num_batches_tracked.item<int64_t>());
    }
    conv->zero_grad();
    bn->zero_grad();
    fused->zero_grad();
  }

  conv->eval();
  bn->eval();
  fused->eval();
  const auto x = torch::randn(c.input_shape, torch::kFloat64);
  expect_close(fused(x), bn(conv(x)), "eval output");
  {
    torch::NoGradGuard no_grad;
    expect_close(fused(x), bn(conv(x)), "eval output under NoGradGuard");
  }
}

ConvBN2dModuleTest::ParamType make_case(
    std::string name, convbn::ConvBN2dOptions options, std::vector<int64_t> shape) {
  return Case{std::move(name), std::move(options), std::move(shape)};
}

INSTANTIATE_TEST_SUITE_P(
    Configurations,
    ConvBN2dModuleTest,
    ::testing::Values(
        make_case("Basic3x3", convbn::ConvBN2dOptions(3, 8, 3).padding(1), {4, 3, 9, 9}),
        make_case(
            "StridedGroupedBiasCumulative",
            convbn::ConvBN2dOptions(4, 6, {3, 2}).stride({2, 1}).padding({1, 0})
                .groups(2).bias(true).momentum(std::nullopt),
            {3, 4, 9, 8}),
        make_case(
            "SameEvenKernelDilated",
            convbn::ConvBN2dOptions(3, 5, 4).padding(torch::kSame).dilation({1, 2}),
            {2, 3, 10, 11}),
        make_case(
            "ReflectPaddingSaveOutput",
            convbn::ConvBN2dOptions(3, 4, 3).padding(2).padding_mode(torch::kReflect)
                .memory_efficient(false).momentum(0.3).eps(1e-3),
            {2, 3, 7, 7}),
        make_case(
            "NoAffineValidPadding",
            convbn::ConvBN2dOptions(2, 3, 1).padding(torch::kValid).affine(false),
            {5, 2, 4, 4}),
        make_case(
            "NoRunningStatsUsesBatchStatsInEval",
            convbn::ConvBN2dOptions(3, 4, 3).track_running_stats(false),
            {3, 3, 6, 6})),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

TEST(ConvBN2dModule, RoundTripsThroughThePairAndItsOptions) {
  torch::manual_seed(0);
  convbn::ConvBN2d fused(convbn::ConvBN2dOptions(3, 4, 3).bias(true).momentum(std::nullopt));
  fused(torch::randn({2, 3, 5, 5}));  // moves the running statistics
  auto [conv, bn] = convbn::to_modules(fused);
  EXPECT_TRUE(conv->options.bias());
  EXPECT_FALSE(bn->options.momentum().has_value());
  bn->weight.set_requires_grad(false);  // a frozen gamma stays frozen
  convbn::ConvBN2d back = convbn::from_modules(conv, bn);
  EXPECT_FALSE(back->bn_weight.requires_grad());
  EXPECT_TRUE(back->weight.requires_grad());
  const auto ours = fused->named_parameters();
  const auto theirs = back->named_parameters();
  ASSERT_EQ(ours.size(), theirs.size());
  for (const auto& item : ours) {
    EXPECT_TRUE(torch::equal(item.value(), theirs[item.key()])) << item.key();
  }
  for (const auto& item : fused->named_buffers()) {
    EXPECT_TRUE(torch::equal(item.value(), back->named_buffers()[item.key()])) << item.key();
  }
}

TEST(ConvBN2dModule, ToDoubleKeepsTheBatchCountAnInteger) {
  convbn::ConvBN2d fused(convbn::ConvBN2dOptions(3, 4, 3));
  fused->to(torch::kFloat64);
  EXPECT_EQ(fused->weight.scalar_type(), torch::kFloat64);
  EXPECT_EQ(fused->running_var.scalar_type(), torch::kFloat64);
  EXPECT_EQ(fused->num_batches_tracked.scalar_type(), torch::kLong);
  fused(torch::randn({2, 3, 5, 5}, torch::kFloat64));
  EXPECT_EQ(fused->num_batches_tracked.item<int64_t>(), 1);
}

TEST(ConvBN2dModule, CloneIsDeep) {
  convbn::ConvBN2d fused(convbn::ConvBN2dOptions(3, 4, 3));
  auto copy = std::dynamic_pointer_cast<convbn::ConvBN2dImpl>(fused->clone());
  ASSERT_NE(copy, nullptr);
  copy->forward(torch::randn({2, 3, 5, 5}));
  EXPECT_EQ(copy->num_batches_tracked.item<int64_t>(), 1);
  EXPECT_EQ(fused->num_batches_tracked.item<int64_t>(), 0);
  EXPECT_TRUE(torch::equal(fused->running_mean, torch::zeros({4})));
}

TEST(ConvBN2dModule, SavesAndLoadsWithTorchSerialize) {
  torch::manual_seed(0);
  convbn::ConvBN2d fused(convbn::ConvBN2dOptions(3, 4, 3).bias(true));
  fused(torch::randn({2, 3, 5, 5}));
  std::stringstream stream;
  torch::save(fused, stream);
  convbn::ConvBN2d loaded(convbn::ConvBN2dOptions(3, 4, 3).bias(true));
  torch::load(loaded, stream);
  for (const auto& item : fused->named_parameters()) {
    EXPECT_TRUE(torch::equal(item.value(), loaded->named_parameters()[item.key()])) << item.key();
  }
  for (const auto& item : fused->named_buffers()) {
    EXPECT_TRUE(torch::equal(item.value(), loaded->named_buffers()[item.key()])) << item.key();
  }
}

TEST(ConvBN2dModule, BadOptionsAndInputsSayWhatToFix) {
  auto message = [](auto&& make) -> std::string {
    try {
      make();
    } catch (const c10::Error& e) {
      return e.what_without_backtrace();
    }
    return "no error";
  };
  EXPECT_NE(message([] { convbn::ConvBN2d(convbn::ConvBN2dOptions(3, 4, 3).groups(2)); })
                .find("in_channels (3) must be a positive multiple of groups (2)"),
            std::string::npos);
  EXPECT_NE(message([] {
              convbn::ConvBN2d(convbn::ConvBN2dOptions(3, 4, 3).stride(2).padding(torch::kSame));
            }).find("kSame is not supported for strided"),
            std::string::npos);
  EXPECT_NE(message([] { convbn::ConvBN2d(convbn::ConvBN2dOptions(3, 4, 3).eps(0)); })
                .find("eps must be a positive finite number"),
            std::string::npos);
  convbn::ConvBN2d fused(convbn::ConvBN2dOptions(3, 4, 3));
  EXPECT_NE(message([&] { fused(torch::randn({3, 5, 5})); }).find("unsqueeze(0)"),
            std::string::npos);
  // One value per channel in training: the op refuses, the statistics stay.
  EXPECT_NE(message([&] { fused(torch::randn({1, 3, 3, 3})); }).find("more than 1 value"),
            std::string::npos);
  EXPECT_EQ(fused->num_batches_tracked.item<int64_t>(), 0);
  EXPECT_TRUE(torch::equal(fused->running_var, torch::ones({4})));
}

TEST(ConvBN2dModule, PrettyPrintNamesTheOptions) {
  std::ostringstream os;
  os << convbn::ConvBN2d(convbn::ConvBN2dOptions(3, 4, 3).padding(torch::kSame).momentum(std::nullopt));
  EXPECT_NE(os.str().find("convbn::ConvBN2d(3, 4, kernel_size=[3, 3]"), std::string::npos) << os.str();
  EXPECT_NE(os.str().find("padding=kSame"), std::string::npos) << os.str();
  EXPECT_NE(os.str().find("momentum=None"), std::string::npos) << os.str();
}

} // namespace
