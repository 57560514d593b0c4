// The provisioned dashboard's type, built from Grafana's published schema (@grafana/schema,
// the version of the Grafana image that docker-compose.yml pins): the dashboard model and
// the options and field configuration of each core panel plugin it uses. The test writes
// the dashboard JSON as an object literal with `satisfies SononodeDashboard`, so the
// TypeScript compiler reports a misspelt or unknown field, a wrong value type, a value
// outside an enumeration and a missing required option.
import type { Dashboard, FieldConfig, FieldConfigSource, Panel, RowPanel } from '@grafana/schema';
import type * as stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type * as timeseries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';

// JSON holds an enumeration's values, not TypeScript's nominal enum members: map each
// string enum to the union of its values and each numeric enum to its numbers (a plain
// `number` accepts any numeric enum member, so the mapping goes through the literal).
export type Json<T> =
  T extends string ? (string extends T ? string : `${T}`)
  : T extends number ? (`${T}` extends `${infer N extends number}` ? N : never)
  : T extends boolean ? T
  : T extends ReadonlyArray<infer U> ? Array<Json<U>>
  : T extends object ? { [K in keyof T]: Json<T[K]> }
  : T;

// A panel of plugin `Type` whose `options` and `fieldConfig.defaults.custom` are the
// plugin's own schema (Grafana's generic Panel leaves both open).
type PanelOf<Type extends string, Options, Custom> =
  Omit<Json<Panel>, 'type' | 'options' | 'fieldConfig'> & {
    type: Type;
    options: Json<Options>;
    fieldConfig: Omit<Json<FieldConfigSource>, 'defaults'> & {
      defaults: Omit<Json<FieldConfig>, 'custom'> & { custom?: Json<Custom> };
    };
  };

export type SononodePanel =
  | PanelOf<'timeseries', timeseries.Options, timeseries.FieldConfig>
  | PanelOf<'stat', stat.Options, Record<string, never>>
  | PanelOf<'table', table.Options, table.FieldConfig>
  | (Omit<Json<RowPanel>, 'type' | 'panels'> & { type: 'row'; panels: [] });

export type SononodeDashboard = Omit<Json<Dashboard>, 'panels'> & {
  panels: SononodePanel[];
};
