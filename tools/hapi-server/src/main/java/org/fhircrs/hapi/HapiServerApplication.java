package org.fhircrs.hapi;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.context.annotation.Import;

/**
 * A HAPI FHIR JPA server for FHIR R4 on H2, for the fhir-crs integration tests and benchmarks.
 *
 * <p>HAPI's own JPA configuration (DAOs, resource providers, search, validation support), the
 * Batch2 job engine with its in-memory broker (Bulk Data {@code $export}), and this project's
 * {@link ServerBeans} (storage settings, entity manager, the REST servlet on {@code /fhir/*}).
 * Run by {@code scripts/hapi-server PORT DATA_DIR}.
 */
@SpringBootApplication(excludeName = {
    "org.springframework.boot.autoconfigure.quartz.QuartzAutoConfiguration",
    "org.springframework.boot.autoconfigure.thymeleaf.ThymeleafAutoConfiguration",
    // HAPI brings the Elasticsearch client jars; without this Boot would sniff for a node on :9200
    "org.springframework.boot.autoconfigure.elasticsearch.ElasticsearchRestClientAutoConfiguration",
    "org.springframework.boot.autoconfigure.elasticsearch.ElasticsearchClientAutoConfiguration",
    "org.springframework.boot.autoconfigure.data.elasticsearch.ElasticsearchDataAutoConfiguration",
    "org.springframework.boot.autoconfigure.data.elasticsearch.ElasticsearchRepositoriesAutoConfiguration",
})
@Import({
    HapiJpaConfig.class,
    JpaR4Config.class,
    JpaBatch2Config.class,
    Batch2JobsConfig.class,
    SubscriptionChannelConfig.class,
    ThreadPoolFactoryConfig.class,
    ServerBeans.class,
})
public class HapiServerApplication {

    public static void main(String[] args) {
        SpringApplication.run(HapiServerApplication.class, args);
    }
}
