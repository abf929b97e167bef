"""Learn: what the metric is, why short paths keep the function, what the step rules solve, and what
each chart shows, beside live figures of the walk on the Explore page."""
from __future__ import annotations

import streamlit as st

from app import charts, session


def render() -> None:
    s = session.state()
    st.title("How a functionally invariant walk works")
    st.markdown("A trained network is one point **w** in weight space. Most directions there barely change what "
                "the network computes. Measure length by how far the **outputs** move and the short paths connect "
                "networks that compute (almost) the same function.")
    st.subheader("1. The metric")
    st.latex(r"g(w) = \frac{1}{N}\sum_{i=1}^{N} J_i^\top J_i,\qquad J_i = \frac{\partial f(x_i; w)}{\partial w}")
    st.latex(r"\theta^\top g\,\theta \;\approx\; \frac{1}{N}\sum_i \lVert f(x_i; w+\theta) - f(x_i; w)\rVert^2")
    st.markdown("With N probe inputs and C outputs, g has rank at most N·C, far below the number of weights: "
                "almost every direction is flat on the probe. g is never built; g·v is one forward-mode and one "
                "reverse-mode product (jvp then vjp). The output-Fisher variant weights the outputs by "
                r"$\mathrm{diag}(p) - pp^\top$ and ignores a shift of all logits.")
    st.subheader("2. The step rules")
    st.latex(r"\theta^* = \arg\min_\theta\; \theta^\top g\,\theta - \beta\langle\theta, v\rangle"
             r"\quad\text{s.t.}\ \lVert\theta\rVert \le \varepsilon"
             r"\qquad\Rightarrow\qquad \theta^* = \tfrac{\beta}{2}(g + \mu I)^{-1} v")
    st.markdown("μ is solved for so that ‖θ‖ = ε: small β keeps only the flat parts of the goal direction v "
                "(natural-gradient-like), large β gives a plain gradient step. A restoring term pulls the walk "
                "back onto equivalent networks. The authors' **penalty walk** instead takes normalised gradient "
                "steps on the distance to the start network's outputs plus λ times the goal:")
    st.latex(r"u = \nabla_w \sum_{x\in B} D_B\big(p(x;w),\,p(x;w_0)\big) + \lambda\,\nabla h(w),\qquad "
             r"w \leftarrow w - \varepsilon\, u/\lVert u\rVert")
    st.markdown("**Choosing ε (auto).** A long step reaches the goal sooner but moves the outputs away from the "
                "probe, where g does not look. With *auto* the walk sets ε again after every step, like a trust "
                "region: shorter when the training batch starts to lose the classes the start network gave it, "
                "back up to its start when it keeps them. Near a point target a walk can also stall where the "
                "restoring pull cancels the goal's pull, whatever ε is; then auto relaxes ρ, and tightens it again "
                "first if classes are lost. The penalty walk to a point grows λ every step, so a shorter step "
                "would only let λ outgrow the distance walked: there auto holds λ instead, and ε stays. The "
                "**Steps** view plots the ε and ρ of every step.")
    st.markdown("**The step guard.** A probe of 16 inputs leaves most directions free, and in a conv net a few "
                "of them move many other inputs' classes at once. With *guard* on (the default for conv nets' "
                "sparsify and connect walks) a thousand training inputs are checked where the step would land before "
                "it is taken: a step that loses the class of more than 0.3% of them, or moves their predicted "
                "distributions by more than 0.01 nats on average (KL), is halved, up to five times. A guarded step "
                "is shorter than ε: the **Steps** view shows it in ‖θ‖.")
    st.markdown("**A new task, three scenarios.** The walk learns task B while keeping the start network's outputs "
                "on a memory of task-A inputs. How hard that is depends on what the network is told. *permuted*: "
                "the same ten classes, every input shuffled (domain-incremental). *split*: A is classes 0-4, B "
                "classes 5-9, one head of ten outputs, so the network must also tell A's classes from B's without "
                "being told the task (class-incremental: the hardest). *split-heads*: the same classes, each task "
                "scored on its own five outputs, the network told the task (task-incremental): the walk keeps A's "
                "head only, B's outputs move freely. *mnist-fashion*: class-incremental again, MNIST's digits "
                "then Fashion-MNIST's garments as ten more classes of one head of twenty. Naive fine-tuning "
                "(dashed) forgets A: all of it with one head, part of it with a head per task; joint training on "
                "both tasks (dotted) is the upper bound.")
    st.subheader("3. Reading the charts")
    st.markdown("- **Overview**: accuracy per task and loss along the path, baselines dashed; vertical dotted lines "
                "mark step-size changes and branches. For connect, accuracy against the position α along the path "
                "beside the straight line from A to B: its *error barrier* is the worst error on the way minus the "
                "mean of the two ends' errors, and two networks count as connected below 2 points. The straight line "
                "to B with B's hidden units permuted to line up with A's (the same function as B) shows how much of "
                "the plain line's barrier is only the order of the units. For sparsify, accuracy against sparsity: "
                "the walk's weights stay dense until it arrives, so the chart also prunes the start network and the "
                "current point to each sparsity, with no retraining; as the walk goes, the current point's curve "
                "stays high further to the right, up to the target.\n"
                "- **Path**: the weights projected with PCA (basis frozen until you refit) or UMAP; colour is what "
                "the projection loses.\n"
                "- **Steps**: functional step √(θᵀgθ) against Euclidean step ‖θ‖ — big weight moves, small output "
                "moves, which is the point of the method — and the ε and ρ in force at each step.\n"
                "- **Examples**: each row a network along the path, each column a test example, colour the "
                "probability of the true class.\n"
                "- **Metric**: the spectrum of g; a fast drop shows how few directions the probe constrains.\n"
                "- **Boundary** (moons, circles, spirals): the network's decision regions at the current point, "
                "redrawn as it walks: a sparsify walk that keeps its function keeps its boundary.\n"
                "- **Data**: every step's numbers as a table, with downloads (CSV, Parquet, the weights).")
    if s.walker is not None and len(s.walker.record) > 1:
        st.subheader("Live: the walk on the Explore page")
        runs = [(b.label, b.walker.record.to_frame()) for b in s.branches]
        st.plotly_chart(charts.step_lengths(runs), key="learn_steps", theme=None)
    else:
        st.info("Take a few steps on the Explore page to see live figures here.")
