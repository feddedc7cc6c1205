import Metrics
import Prometheus

/// The process-wide Prometheus registry behind swift-metrics (bootstrapped once per process).
public enum NodeMetrics {
    public static let registry: PrometheusCollectorRegistry = {
        let registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = [
            .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10),
            .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1),
            .seconds(2), .seconds(5), .seconds(10), .seconds(30),
        ]
        MetricsSystem.bootstrap(factory)
        return registry
    }()

    /// Installs the registry as the process's metrics backend; call before anything records a metric.
    public static func bootstrap() { _ = registry }

    /// Prometheus text exposition of everything recorded so far.
    @Sendable public static func text() -> [UInt8] { registry.emitToBuffer() }
}
