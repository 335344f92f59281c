#include "plan.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <numeric>
#include <sstream>

#include "errors.h"

namespace moetrt {
namespace {

// Launch-shape constants of kernels/plan.py (ALIGN_MAX_PROGRAMS); tests compare both planners.
constexpr int64_t kAlignMaxPrograms = 128;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t max_blocks(const Shape& s, int64_t t, int64_t bm) {
    int64_t slots = t * s.top_k;
    int64_t shared = s.has_shared_expert() ? cdiv(t, bm) : 0;
    return cdiv(slots, bm) + std::min(s.num_experts, slots) + shared;
}

// plan.py grid_blocks: row blocks rounded up to whole groups of the grouped GEMMs' GM blocks
int64_t grid_blocks(const Bucket& bucket, int64_t blocks) {
    const Stage* gate_up = bucket.stage("gate_up");
    const Stage* down = bucket.stage("down_rows");
    int64_t group = std::lcm(gate_up ? gate_up->constexpr_int_or("GM", 1) : 1,
                             down ? down->constexpr_int_or("GM", 1) : 1);
    return cdiv(blocks, group) * group;
}

// plan.py TMA_DESCRIPTOR_BYTES / TMA_DESCRIPTORS: the device-built descriptors of a grouped GEMM whose stage
// compiled with TMA, one 128-byte CUtensorMap each per program, in Triton's global scratch
constexpr int64_t kTmaDescriptorBytes = 128;
bool stage_uses_tma(const Bucket& bucket, const char* stage) {
    const Stage* s = bucket.stage(stage);
    return s != nullptr && s->constexpr_int_or("TMA", 0) != 0;
}
// plan.py persistent_grid: one program per tile, or with PERSIST at most that many (each loops over tiles)
int64_t persistent_grid(const Stage* stage, int64_t tiles) {
    int64_t persist = stage ? stage->constexpr_int_or("PERSIST", 0) : 0;
    return persist > 0 ? std::min(persist, tiles) : tiles;
}
// plan.py tma_descriptors: a persistent program also builds one over the shared expert's weight
int64_t tma_descriptors(const Bucket& bucket, const char* stage) {
    const Stage* s = bucket.stage(stage);
    int64_t base = std::string(stage) == "gate_up" ? 1 : 2;
    bool shared = s->constexpr_int_or("IS", 0) > 0 && s->constexpr_int_or("PERSIST", 0) > 0;
    return base + (shared ? 1 : 0);
}

struct Layout {
    std::vector<std::pair<std::string, Region>> regions;
    const Region& operator[](const std::string& name) const {
        for (const auto& [n, r] : regions)
            if (n == name) return r;
        throw Error(ErrorKind::Invalid, "workspace has no region " + name, "");
    }
};

Layout workspace_layout(const Bundle& b, const Bucket& bucket, int64_t t) {
    const Shape& s = b.shape;
    int64_t k = s.top_k, e = s.num_experts, h = s.hidden_size;
    int64_t rows = t * k + (s.has_shared_expert() ? t : 0);
    int64_t blocks = grid_blocks(bucket, max_blocks(s, t, bucket.config_int("gate_up", "BM")));
    int64_t esize = static_cast<int64_t>(b.element_size());
    const Stage* group = bucket.stage("topk_group");
    bool gemv = group != nullptr;
    bool fused = bucket.stage("experts") != nullptr;
    const Stage* routed_stage = bucket.stage("routed_experts");
    bool routed = routed_stage != nullptr;
    bool routed_acc = routed && routed_stage->constexpr_int_or("FUSED", 0) != 0;  // plan.py routed_fused
    int64_t groups = gemv ? std::min(e, t * k) : 0;
    int64_t tm = gemv ? group->constexpr_int("TM") : 0;
    int64_t tile_h = gemv ? bucket.config_int("gemv", "BH") : bucket.config_int("down", "BH");
    int64_t split = bucket.config_int("router", "SPLIT");
    // split gate_up (plan.py gate_up_splits): its SK constexpr; partial sums and a ticket per tile
    const Stage* gate_up = bucket.stage("gate_up");
    int64_t splits = gate_up ? gate_up->constexpr_int_or("SK", 1) : 1;
    int64_t gate_up_tiles = splits > 1 ? blocks * cdiv(s.nmax(), gate_up->constexpr_int("BN")) : 0;
    // fp8 activations (plan.py quantizes_x_once): the router quantizes x, gate_up the routed activations
    const Stage* router = bucket.stage("router");
    bool xq = router != nullptr && router->constexpr_int_or("ACT_FP8", 0) != 0;
    int64_t block = xq ? router->constexpr_int("WB") : 1;
    int64_t inter = s.intermediate_size;
    // plan.py tma_scratch_bytes: the larger of the TMA grouped GEMMs' descriptors (they run one after the other)
    int64_t tma_scratch = 0;
    if (stage_uses_tma(bucket, "gate_up"))
        tma_scratch = persistent_grid(gate_up, blocks * cdiv(s.nmax(), gate_up->constexpr_int("BN")) * splits) *
                      tma_descriptors(bucket, "gate_up") * kTmaDescriptorBytes;
    if (stage_uses_tma(bucket, "down_rows")) {
        const Stage* down = bucket.stage("down_rows");
        tma_scratch = std::max(tma_scratch, persistent_grid(down, blocks * cdiv(h, down->constexpr_int("BH"))) *
                                                tma_descriptors(bucket, "down_rows") * kTmaDescriptorBytes);
    }
    const std::vector<std::pair<const char*, int64_t>> sizes = {
        {"counts", 4 * (e + 2)},
        {"tickets", 16},
        {"htickets", 4 * cdiv(h, tile_h)},
        {"ngroups", gemv ? 16 : 0},
        {"gu_tickets", 4 * gate_up_tiles},
        {"units", routed ? 4 * (3 + t) : 0},
        {"acc", fused || routed_acc ? 4 * t * h : 0},
        {"group_expert", 4 * groups},
        {"expert_slots", 4 * e * tm},
        {"logits", 4 * split * t * e},
        {"gate_part", 4 * split * t},
        {"gate", 4 * t},
        {"topk_ids", 4 * t * k},
        {"topk_w", 4 * t * k},
        {"rank", 4 * t * k},
        {"offsets", 4 * (e + 2)},
        {"nblocks", 4},
        {"block_expert", 4 * blocks},
        {"block_row0", 4 * blocks},
        {"sorted_slot", 4 * rows},
        // fp8 activations: the routed rows' activation is actq, act keeps the shared expert's t rows only
        {"act", fused ? 0 : esize * (xq ? (s.has_shared_expert() ? t : 0) : rows) * s.nmax()},
        {"xq", xq ? t * h : 0},
        {"xs", xq ? 4 * t * cdiv(h, block) : 0},
        {"actq", xq ? t * k * inter : 0},  // the routed rows only: the shared expert's activation is in act
        {"acts", xq ? 4 * t * k * cdiv(inter, block) : 0},
        {"gu_part", splits > 1 ? 4 * splits * (t * k + t) * 2 * s.nmax() : 0},
        {"yw", fused || routed ? 0 : esize * rows * h},
        {"tma_scratch", tma_scratch},
    };
    Layout layout;
    int64_t offset = 0;
    for (const auto& [name, nbytes] : sizes) {
        std::string n(name);
        int64_t align =
            (n == "tickets" || n == "htickets" || n == "ngroups" || n == "gu_tickets" || n == "units" || n == "acc")
                ? 16
                : 256;
        offset = cdiv(offset, align) * align;
        layout.regions.emplace_back(n, Region{offset, nbytes});
        offset += nbytes;
    }
    layout.regions.emplace_back("total", Region{0, cdiv(offset, 256) * 256});
    return layout;
}

class Planner {
public:
    Planner(const Bundle& b, const Bucket& bucket, int64_t t, const Layout& layout)
        : b_(b), bucket_(bucket), t_(t), layout_(layout) {}

    void add(const char* stage_name, std::array<int64_t, 3> grid, const std::map<std::string, int64_t>& ints = {}) {
        const Stage* stage = bucket_.stage(stage_name);
        if (!stage) throw Error(ErrorKind::Bundle, std::string("kernel bundle bucket lacks stage ") + stage_name,
                                "rebuild the kernels with this moetrt version");
        if (grid[0] < 1 || grid[0] > 0x7fffffff || grid[1] < 1 || grid[1] > 65535 || grid[2] < 1 || grid[2] > 65535)
            throw Error(ErrorKind::Invalid,
                        std::string("stage ") + stage_name + " needs a grid the GPU cannot launch for " +
                            std::to_string(t_) + " tokens",
                        "split the tokens into smaller calls");
        const Kernel& kernel = b_.kernels[stage->kernel];
        Launch launch{stage_name, stage->kernel, grid, {}, stage->constexpr_int_or("PDL", 0) != 0,
                      stage->constexpr_int_or("PERSIST", 0) > 0};
        for (const ParamSource& src : kernel.sources) {
            if (src.source == "T") {
                launch.args.push_back({Arg::Kind::Tokens, t_, ""});
            } else if (src.source == "int") {
                auto it = ints.find(src.ref);
                if (it == ints.end())
                    throw Error(ErrorKind::Bundle, "kernel " + kernel.key + " takes host value " + src.ref +
                                                      ", which this library does not compute",
                                "use the moetrt version that built the kernels");
                launch.args.push_back({Arg::Kind::Int, it->second, src.ref});
            } else if (src.source == "ws") {
                launch.args.push_back({Arg::Kind::Workspace, layout_[src.ref].offset, src.ref});
            } else if (src.source == "state") {
                auto it = b_.state_offsets.find(src.ref);
                if (it == b_.state_offsets.end())
                    throw Error(ErrorKind::Bundle, "kernel " + kernel.key + " takes state " + src.ref +
                                                      ", which the bundle does not lay out",
                                "rebuild the kernels with this moetrt version");
                launch.args.push_back({Arg::Kind::State, it->second, src.ref});
            } else if (src.source == "in" || src.source == "out") {
                int index = src.source == "in" ? b_.input_index(src.ref) : b_.output_index(src.ref);
                if (index < 0)  // absent optional tensor: never read (a constexpr flag disables it)
                    launch.args.push_back({Arg::Kind::Input, 0, "hidden_states"});
                else
                    launch.args.push_back({src.source == "in" ? Arg::Kind::Input : Arg::Kind::Output, index, src.ref});
            } else {
                throw Error(ErrorKind::Bundle, "kernel " + kernel.key + " has parameter source " + src.source,
                            "rebuild the kernels with this moetrt version");
            }
        }
        // plan.py TMA_SCRATCH_ARG: past the kernel's own parameters, Triton's global-scratch pointer
        if (stage_uses_tma(bucket_, stage_name))
            launch.args.push_back({Arg::Kind::Workspace, layout_["tma_scratch"].offset, "tma_scratch"});
        launches.push_back(std::move(launch));
    }

    int64_t stage_int(const char* stage, const char* name) const {
        const Stage* s = bucket_.stage(stage);
        if (!s) throw Error(ErrorKind::Bundle, std::string("kernel bundle bucket lacks stage ") + stage,
                            "rebuild the kernels with this moetrt version");
        return s->constexpr_int(name);
    }

    std::vector<Launch> launches;

private:
    const Bundle& b_;
    const Bucket& bucket_;
    int64_t t_;
    const Layout& layout_;
};

}  // namespace

size_t bucket_for(const Bundle& bundle, int64_t num_tokens) {
    size_t best = bundle.buckets.size();
    for (size_t i = 0; i < bundle.buckets.size(); ++i) {
        const auto& bound = bundle.buckets[i].bound;
        if (bound && num_tokens <= *bound && (best == bundle.buckets.size() || !bundle.buckets[best].bound ||
                                              *bound < *bundle.buckets[best].bound))
            best = i;
    }
    if (best == bundle.buckets.size())
        for (size_t i = 0; i < bundle.buckets.size(); ++i)
            if (!bundle.buckets[i].bound) best = i;
    if (best == bundle.buckets.size())
        throw Error(ErrorKind::Invalid, "kernel bundle has no token bucket for " + std::to_string(num_tokens) + " tokens",
                    "compile it with the unbounded bucket (the default of compile_kernels)");
    return best;
}

Plan plan_for(const Bundle& b, int64_t t) {
    if (t < 0) throw Error(ErrorKind::Invalid, "negative token count " + std::to_string(t), "pass T >= 0");
    Plan plan;
    plan.num_tokens = t;
    if (t == 0) return plan;
    const Bucket& bucket = b.buckets[bucket_for(b, t)];
    const Shape& s = b.shape;
    int64_t e = s.num_experts, h = s.hidden_size, k = s.top_k;
    Layout layout = workspace_layout(b, bucket, t);
    Planner p(b, bucket, t, layout);
    const Region& acc = layout["acc"];
    // plus the columns of programs that quantize x for fp8 activations (plan.py quantize_columns)
    const Stage* router_stage = bucket.stage("router");
    // a decode bucket without a top-k stage: the router kernel's last program routes (plan.py routes_in_router)
    bool routing_launch = bucket.stage("topk") != nullptr;
    int64_t quantize_columns = router_stage ? router_stage->constexpr_int_or("QCOLS", 0) : 0;
    // and the shared gate's column where it has one of its own (plan.py shared_gate_column)
    int64_t gate_column = router_stage ? router_stage->constexpr_int_or("GATE_COL", 0) : 0;
    p.add("router",
          {cdiv(t, p.stage_int("router", "BT")),
           cdiv(e, p.stage_int("router", "BE")) + gate_column + quantize_columns, p.stage_int("router", "SPLIT")},
          {{"zero_words", (acc.offset + acc.nbytes) / 4}});
    int64_t bm = bucket.config_int("gate_up", "BM");
    int64_t blocks = max_blocks(s, t, bm);
    if (bucket.stage("routed_experts")) {  // plan.py routed_units: routing, gate_up N tiles, H tiles per token
        int64_t bn = p.stage_int("routed_experts", "BN");
        int64_t shared_tiles = s.has_shared_expert() ? cdiv(s.shared_intermediate_size, bn) : 0;
        int64_t h_tiles = p.stage_int("routed_experts", "FUSED") ? 0 : cdiv(h, p.stage_int("routed_experts", "BH"));
        int64_t per_token = shared_tiles + k * cdiv(s.intermediate_size, bn) + h_tiles;
        p.add("routed_experts", {1 + t * per_token, 1, 1});  // the routing unit first
    } else if (bucket.stage("topk_group")) {
        int64_t gmax = std::min(e, t * k);
        int64_t groups = gmax + (s.has_shared_expert() ? 1 : 0);
        p.add("topk_group", {cdiv(t, p.stage_int("topk_group", "RT")), 1, 1});
        p.add("gemv_gate_up", {groups * cdiv(s.nmax(), p.stage_int("gemv_gate_up", "BN")), 1, 1}, {{"gmax", gmax}});
        p.add("gemv_down", {groups * cdiv(h, p.stage_int("gemv_down", "BH")), 1, 1}, {{"gmax", gmax}});
    } else {
        bool decode = bucket.stage("align") == nullptr;
        int64_t per_expert = cdiv(t, bm);  // a token picks an expert at most once
        if (routing_launch) {
            int64_t chunk = p.stage_int("topk", "CS");
            std::map<std::string, int64_t> topk_ints = {{"block_iters", 0}, {"slot_iters", 0}};
            if (decode) topk_ints = {{"block_iters", per_expert}, {"slot_iters", cdiv(t * k, chunk)}};
            p.add("topk", {cdiv(t, p.stage_int("topk", "RT")), 1, 1}, topk_ints);
        }
        if (!decode) {
            int64_t chunk = p.stage_int("topk", "CS");
            int64_t programs = std::max<int64_t>(1, std::min(kAlignMaxPrograms, std::max(cdiv(t * k, chunk), per_expert)));
            p.add("align", {programs, 1, 1},
                  {{"block_iters", cdiv(per_expert, programs)}, {"slot_iters", cdiv(t * k, chunk * programs)}, {"nprog", programs}});
        }
        if (bucket.stage("experts")) {
            // its last program casts the fp32 sum into the output (no finalize launch)
            p.add("experts", {blocks * cdiv(s.nmax(), p.stage_int("experts", "BN")), 1, 1});
        } else {
            int64_t grid = grid_blocks(bucket, blocks);
            p.add("gate_up", {persistent_grid(bucket.stage("gate_up"), grid * cdiv(s.nmax(), p.stage_int("gate_up", "BN")) *
                                                                       p.stage_int("gate_up", "SK")),
                              1, 1});
            p.add("down_rows", {persistent_grid(bucket.stage("down_rows"), grid * cdiv(h, p.stage_int("down_rows", "BH"))), 1, 1});
            if (!decode)
                p.add("reduce", {cdiv(t, p.stage_int("reduce", "BT")), cdiv(h, p.stage_int("reduce", "BH")), 1});
        }
    }
    plan.launches = std::move(p.launches);
    for (const Launch& launch : plan.launches)
        for (const Arg& a : launch.args)
            if (a.kind == Arg::Kind::State) plan.uses_state = true;
    plan.layout = layout.regions;
    plan.workspace_bytes = layout["total"].nbytes;
    return plan;
}

std::array<int64_t, 3> device_grid(const Launch& launch, int64_t sm_count) {
    std::array<int64_t, 3> grid = launch.grid;
    if (launch.persistent && sm_count > 0) grid[0] = std::min(grid[0], sm_count);
    return grid;
}

void check_pointer_counts(const Bundle& b, size_t num_inputs, size_t num_outputs) {
    auto refuse = [](size_t got, const std::vector<std::string>& names, const char* what) {
        std::string order;
        for (const auto& n : names) order += (order.empty() ? "" : ", ") + n;
        throw Error(ErrorKind::Invalid,
                    std::to_string(got) + " " + what + " pointers for " + std::to_string(names.size()) + " " + what + "s",
                    "pass them in this order: " + order);
    };
    if (num_inputs != b.inputs.size()) refuse(num_inputs, b.inputs, "input");
    if (num_outputs != b.outputs.size()) refuse(num_outputs, b.outputs, "output");
}

std::vector<uint64_t> launch_slots(const Bundle& b, const Launch& launch, int64_t num_tokens,
                                   const uint64_t* inputs, const uint64_t* outputs, uint64_t workspace,
                                   uint64_t state) {
    const Kernel& kernel = b.kernels[launch.kernel];
    // the kernel's parameters, then the scratch pointers Triton appends: null, or from a launch arg past the
    // parameters (tma_scratch)
    std::vector<uint64_t> slots(kernel.params.size() + static_cast<size_t>(kernel.scratch_params), 0);
    if (launch.args.size() > slots.size())
        throw Error(ErrorKind::Bundle, "stage " + launch.stage + " has more arguments than its kernel takes",
                    "rebuild the kernels with this moetrt version");
    for (size_t j = 0; j < launch.args.size(); ++j) {
        const Arg& a = launch.args[j];
        int64_t value = 0;
        switch (a.kind) {
            case Arg::Kind::Input: value = static_cast<int64_t>(inputs[a.value]); break;
            case Arg::Kind::Output: value = static_cast<int64_t>(outputs[a.value]); break;
            case Arg::Kind::Workspace: value = static_cast<int64_t>(workspace) + a.value; break;
            case Arg::Kind::Tokens: value = num_tokens; break;
            case Arg::Kind::Int: value = a.value; break;
            case Arg::Kind::State: value = static_cast<int64_t>(state) + a.value; break;
        }
        if (j >= kernel.params.size() || kernel.params[j] == ParamKind::Pointer) {
            slots[j] = static_cast<uint64_t>(value);
        } else {
            if (value < INT32_MIN || value > INT32_MAX)
                throw Error(ErrorKind::Invalid, "stage " + launch.stage + " argument " + std::to_string(j) + " (" +
                                                    std::to_string(value) + ") does not fit an i32",
                            "split the tokens into smaller calls");
            auto v32 = static_cast<uint32_t>(static_cast<int32_t>(value));
            slots[j] = v32;  // little-endian: the low 4 bytes of the slot
        }
    }
    return slots;
}

namespace {
void quote(std::ostringstream& out, const std::string& text) {
    out << '"';
    for (char c : text) {
        if (c == '"' || c == '\\') out << '\\';
        out << c;
    }
    out << '"';
}
}  // namespace

std::string describe(const Bundle& b, const Plan& plan) {
    std::ostringstream out;
    out << "{\"num_tokens\":" << plan.num_tokens << ",\"workspace\":" << plan.workspace_bytes << ",\"layout\":{";
    for (size_t i = 0; i < plan.layout.size(); ++i) {
        if (i) out << ',';
        quote(out, plan.layout[i].first);
        out << ":[" << plan.layout[i].second.offset << ',' << plan.layout[i].second.nbytes << ']';
    }
    out << "},\"launches\":[";
    static const char* kSource[] = {"in", "out", "ws", "T", "int", "state"};
    for (size_t i = 0; i < plan.launches.size(); ++i) {
        const Launch& l = plan.launches[i];
        if (i) out << ',';
        out << "{\"stage\":";
        quote(out, l.stage);
        out << ",\"key\":";
        quote(out, b.kernels[l.kernel].key);
        out << ",\"grid\":[" << l.grid[0] << ',' << l.grid[1] << ',' << l.grid[2] << "],\"pdl\":"
            << (l.pdl ? "true" : "false") << ",\"args\":[";
        for (size_t j = 0; j < l.args.size(); ++j) {
            const Arg& a = l.args[j];
            if (j) out << ',';
            out << '[';
            quote(out, kSource[static_cast<int>(a.kind)]);
            out << ',';
            if (a.kind == Arg::Kind::Tokens) quote(out, "");
            else if (a.kind == Arg::Kind::Int) quote(out, std::to_string(a.value));
            else quote(out, a.name);
            out << ']';
        }
        out << "]}";
    }
    out << "]}";
    return out.str();
}

}  // namespace moetrt
